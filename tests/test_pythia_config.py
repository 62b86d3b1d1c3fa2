"""The paper's Pythia run stays one command: its config and README's `layerwise` example name
hooks that exist in the installed SAE-Lens registry and in a Pythia-70M-shaped model.

The registry's metadata (sae_lens/pretrained_saes.yaml) lists each release's model, hook
names and repository, but no widths: d_sae lives in each SAE's cfg.json on the hub. So the
widths checked offline are the hooks' d_in against Pythia-70M's shape; a dictionary whose
d_sae or d_in disagrees is refused at load time with both widths (tests/test_saes.py).
"""

import re
import shlex
from pathlib import Path

import pytest
from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

from lm_superposition.config import RunConfig
from lm_superposition.models import hook_catalogue

REPO = Path(__file__).resolve().parents[1]
PYTHIA_CONFIG = REPO / "experiments" / "pythia70m_layerwise.toml"

# The paper's 19 hook points: the embedding output, then attn_out, mlp_out, resid_post of each of 6 blocks.
PAPER_HOOKS = {"blocks.0.hook_resid_pre"} | {
    f"blocks.{layer}.hook_{kind}" for layer in range(6) for kind in ("attn_out", "mlp_out", "resid_post")
}


def _readme_layerwise_releases() -> list[str]:
    """The --release names of README's `lm-superposition layerwise --model pythia-70m-deduped` example."""
    text = (REPO / "README.md").read_text()
    match = re.search(r"lm-superposition layerwise --model pythia-70m-deduped(.*?)#", text, flags=re.S)
    assert match, "README lost its layerwise example for pythia-70m-deduped"
    words = shlex.split(match.group(1).replace("\\\n", " "))
    releases = words[words.index("--release") + 1 :]
    return releases[: next(i for i, word in enumerate(releases) if word.startswith("--"))]


@pytest.fixture(scope="module")
def registry():
    return get_pretrained_saes_directory()


def _registry_hooks(registry, release: str) -> list[str]:
    if release not in registry:
        pythia = sorted(name for name in registry if "pythia-70m" in name)
        raise AssertionError(
            f"release {release!r} is not in the installed SAE-Lens registry; its Pythia-70M ones: {pythia}"
        )
    return list(registry[release].saes_map)


def test_config_releases_cover_the_papers_19_hooks(registry):
    config = RunConfig.from_toml(PYTHIA_CONFIG)
    assert config.model.names == ["pythia-70m-deduped"]
    hooks = [hook for release in config.saes.releases for hook in _registry_hooks(registry, release)]
    for release in config.saes.releases:
        assert registry[release].model == "pythia-70m-deduped", release
    # res-sm also holds blocks.0.hook_resid_post; the paper's 19 are all there, none twice.
    assert PAPER_HOOKS <= set(hooks)
    assert len(hooks) == len(set(hooks))


def test_readme_layerwise_example_names_the_configs_releases():
    assert sorted(_readme_layerwise_releases()) == sorted(RunConfig.from_toml(PYTHIA_CONFIG).saes.releases)


def test_every_registry_hook_exists_in_pythia_70m_at_its_width(registry, pythia_shaped_model):
    catalogue = {point.name: point.width for point in hook_catalogue(pythia_shaped_model)}
    for release in RunConfig.from_toml(PYTHIA_CONFIG).saes.releases:
        for hook in _registry_hooks(registry, release):
            assert hook in catalogue, f"{release}: {hook} is not a hook of Pythia-70M; it has {sorted(catalogue)}"
            assert catalogue[hook] == 512, f"{release}: {hook} has width {catalogue[hook]}, Pythia-70M's d_model is 512"
