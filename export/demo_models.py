"""Build the tiny random-weight demo models into $EMBER_VAR_DIR/models (diffusers format).

python -m export.demo_models           # every demo model named in models.toml that has a builder
python -m export.demo_models --force   # rebuild even if present (the result is identical)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ember.settings import get_settings
from ember.specs.artifacts import family_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild models that already exist")
    args = parser.parse_args()
    settings = get_settings()
    for family, variants in settings.models.items():
        for variant, entry in variants.items():
            if "demo" not in entry:
                continue
            target = settings.models_dir / entry["demo"]
            if (target / "model_index.json").is_file() and not args.force:
                print(f"{family}/{variant}: {target} exists")
                continue
            try:
                spec = family_spec(family, variant)
            except ValueError:
                print(f"{family}/{variant}: no demo builder yet")
                continue
            print(f"{family}/{variant}: built {spec.build_demo_model(Path(target))}")


if __name__ == "__main__":
    main()
