"""`convert --force` never replaces or writes into its own input (issue 14: `--out` equal to
the source, or its parent, deleted the source model)."""

from __future__ import annotations

import hashlib

import pytest

from erpo_mega.models.convert import convert_hf_to_mcore, main_hf_to_mcore, main_mcore_to_hf
from tests.models.tiny_hf import save_hf_model


def _digest(root) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("overlap")
    hf = save_hf_model("qwen2", root / "models" / "qwen_hf", seed=3)
    mcore = convert_hf_to_mcore(hf, root / "models" / "qwen_mcore", progress=False)
    return root, hf, mcore


@pytest.mark.parametrize("out_of", [lambda hf: hf, lambda hf: hf.parent, lambda hf: hf.parent.parent,
                                    lambda hf: hf / "mcore"], ids=["same", "parent", "grandparent", "inside"])
def test_hf_to_mcore_refuses_an_output_overlapping_its_input(models, out_of, capsys):
    root, hf, _ = models
    before = _digest(root)
    out = out_of(hf)
    rc = main_hf_to_mcore(["--hf-dir", str(hf), "--out", str(out), "--force", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "--hf-dir" in err and "Choose an --out outside it" in err, err
    assert _digest(root) == before, "the source model was touched"


@pytest.mark.parametrize("flag", ["--mcore-dir", "--hf-config"])
def test_mcore_to_hf_refuses_an_output_overlapping_its_inputs(models, flag, capsys):
    root, hf, mcore = models
    before = _digest(root)
    out, why = (mcore.parent, "contains the input") if flag == "--mcore-dir" else (hf / "x", "lies inside the input")
    rc = main_mcore_to_hf(["--mcore-dir", str(mcore), "--hf-config", str(hf), "--out", str(out),
                           "--force", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and why in err and flag in err, err
    assert _digest(root) == before


def test_sibling_output_is_fine(models):
    root, hf, mcore = models
    assert main_mcore_to_hf(["--mcore-dir", str(mcore), "--out", str(root / "models" / "qwen_hf2"),
                             "--no-progress"]) == 0
