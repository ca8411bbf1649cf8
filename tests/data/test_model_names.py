"""The one model-name parser: prefixes, the deprecated ``hf:``, errors that name the way out."""

from __future__ import annotations

import pytest

from biomedvital.data.model_names import PREFIXES, ModelName, parse_model_name


@pytest.mark.parametrize(
    ("name", "prefix", "value"),
    [
        ("hf-hub:llava-hf/llava-1.5-13b-hf", "hf-hub:", "llava-hf/llava-1.5-13b-hf"),
        ("local-dir:/models/x:y", "local-dir:", "/models/x:y"),  # only the first colon splits
        ("tiny:tiny-llava", "tiny:", "tiny-llava"),
        ("open_clip:ViT-B-16", "open_clip:", "ViT-B-16"),
    ],
)
def test_each_prefix_parses(name: str, prefix: str, value: str) -> None:
    parsed = parse_model_name(name)
    assert parsed == ModelName(prefix, value)  # type: ignore[arg-type]
    assert str(parsed) == name


@pytest.mark.parametrize("name", ["llava-hf/llava-1.5-13b-hf", "models/hf-hub:x", "TINY:tiny"])
def test_an_unknown_prefix_names_the_value_and_the_valid_prefixes(name: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_model_name(name, what="backbone")
    message = str(err.value)
    assert f"backbone {name!r}" in message
    assert all(prefix in message for prefix in PREFIXES)


def test_a_registry_refuses_a_prefix_it_cannot_build() -> None:
    with pytest.raises(ValueError, match=r"open_clip: is not built here.*hf-hub:, tiny:"):
        parse_model_name("open_clip:ViT-B-16", ("hf-hub:", "tiny:"))
    with pytest.raises(ValueError, match="names nothing after tiny:"):
        parse_model_name("tiny:")


def test_hf_is_read_as_hf_hub_with_a_deprecation_warning() -> None:
    with pytest.warns(FutureWarning, match=r"'hf:' is deprecated; write hf-hub:org/repo"):
        parsed = parse_model_name("hf:org/repo", ("hf-hub:", "local-dir:", "tiny:"))
    assert parsed == ModelName("hf-hub:", "org/repo")
