"""The fal-protocol gateway: run host, queue host and JS proxy over one job store (see app.py)."""
