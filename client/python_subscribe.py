"""fal's own documented example, unmodified: run `source var/client.env` first (FAL_RUN_HOST,
FAL_QUEUE_RUN_HOST, SSL_CERT_FILE and FAL_KEY must be set before fal_client is imported)."""

import fal_client


def on_queue_update(update):
    if isinstance(update, fal_client.InProgress):
        for log in update.logs:
            print(log["message"])


result = fal_client.subscribe(
    "fal-ai/lcm",
    arguments={"prompt": "a black cat with glowing eyes"},
    with_logs=True,
    on_queue_update=on_queue_update,
)
print(result)
