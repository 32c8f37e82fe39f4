"""Documentation that is generated from code stays in sync with it."""

from pathlib import Path

from orchestrator.config_reference import render

ROOT = Path(__file__).resolve().parents[1]


def test_configuration_reference_matches_the_config_models():
    written = (ROOT / "docs" / "configuration.md").read_text()
    assert written == render(), ("docs/configuration.md is out of date: "
                                 "python -m orchestrator.config_reference > docs/configuration.md")


def test_every_config_field_is_described():
    from pydantic import BaseModel

    from orchestrator.config import ExperimentConfig

    missing = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name}.")
            elif not field.description:
                missing.append(prefix + name)

    walk(ExperimentConfig, "")
    assert not missing, f"config fields without a description: {missing}"
