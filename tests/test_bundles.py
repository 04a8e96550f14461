"""Saved bundles as untrusted input: malformed manifests, tampered arrays, extractors the caller did not name.

Real files throughout: the session's trained router is saved, then edited the way an attacker
or a broken disk would edit it. Each case was one of the defects of issue 21 (AttributeError /
KeyError from a malformed manifest, a manifest that could name any hub id or path to load, a
"weights hash" for hub models that was just the id, P(IK) bundles loaded without a hash check).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from difficulty_router import DifficultyRouter, PIKProbe
from difficulty_router.cli.main import main
from difficulty_router.extraction.model_store import _dequantised_dir


@pytest.fixture
def saved(trained_router, tmp_path) -> Path:
    return trained_router.save(tmp_path / "router")


def edit_manifest(directory: Path, change) -> None:
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest = change(manifest)
    path.write_text(json.dumps(manifest))


def rehash(directory: Path, arrays_file: str = "probes.safetensors", manifest_file: str = "manifest.json") -> None:
    """What a careful attacker does after editing the arrays: record the new hash."""
    digest = hashlib.sha256((directory / arrays_file).read_bytes()).hexdigest()
    edit_manifest_file = directory / manifest_file
    manifest = json.loads(edit_manifest_file.read_text())
    manifest["arrays_sha256"] = digest
    edit_manifest_file.write_text(json.dumps(manifest))


def drop(key):
    def change(manifest):
        manifest.pop(key)
        return manifest
    return change


def drop_nested(outer, key):
    def change(manifest):
        manifest[outer].pop(key)
        return manifest
    return change


@pytest.mark.parametrize("change, needle", [
    (lambda m: [m], "JSON object"),
    (lambda m: "router", "JSON object"),
    (drop("readout"), "'readout' is missing"),
    (drop("extractor"), "'extractor' is missing"),
    (drop_nested("extractor", "model_hash"), "'model_hash' is missing"),
    (drop_nested("readout", "layers"), "'layers' is missing"),
    (lambda m: {**m, "readout": {"layers": "15", "pooling": ["last"]}}, "'layers' must be list"),
    (lambda m: {**m, "policy": {"kind": "utility"}}, "'value' is missing"),
    (lambda m: {**m, "pool": None}, "'pool' must be dict"),
    (lambda m: {**m, "arrays_sha256": 5}, "'arrays_sha256' must be str"),
    (lambda m: {**m, "dropped": {"a": 1}}, "'dropped'"),
])
def test_a_malformed_manifest_is_refused_naming_the_field(saved, extractor, change, needle):
    edit_manifest(saved, change)
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        DifficultyRouter.load(saved, extractor)


def test_the_cli_reports_a_malformed_manifest_without_a_traceback(saved, capsys):
    edit_manifest(saved, lambda m: [m])
    assert main(["route", "--router", str(saved), "What is 2+2?"]) == 2
    err = capsys.readouterr().err
    assert "must hold a JSON object" in err and "Traceback" not in err


def test_a_pickle_in_place_of_the_arrays_is_refused_and_never_run(saved, tmp_path, extractor):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (saved / "probes.safetensors").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ValueError, match="altered"):
        DifficultyRouter.load(saved, extractor)
    rehash(saved)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        DifficultyRouter.load(saved, extractor)
    assert not marker.exists()


def test_swapped_arrays_with_a_recomputed_hash_are_refused(saved, extractor):
    from safetensors.numpy import load_file, save_file

    path = saved / "probes.safetensors"
    original = path.read_bytes()
    arrays = load_file(str(path))
    arrays["success.coef"], arrays["success.platt"] = arrays["success.platt"], arrays["success.coef"]
    save_file(arrays, str(path), metadata={"family": "activation", "lexical": "null"})
    rehash(saved)
    with pytest.raises(ValueError):
        DifficultyRouter.load(saved, extractor)
    path.write_bytes(original)
    arrays = load_file(str(path))
    del arrays["capability"]
    save_file(arrays, str(path), metadata={"family": "activation", "lexical": "null"})
    rehash(saved)
    with pytest.raises(ValueError, match="lacks the array 'capability'"):
        DifficultyRouter.load(saved, extractor)


@pytest.fixture(scope="module")
def dequantised_smollm2(extractor) -> Path:
    """The real SmolLM2 weights as a transformers directory: loading the session's extractor dequantises
    the embedded GGUF once into the model cache (difficulty_router.extraction.model_store), so the directory exists
    whatever ran before."""
    directory = _dequantised_dir(extractor.source, extractor.model_hash)
    assert (directory / "config.json").is_file() and (directory / "model.safetensors").is_file(), directory
    return directory


def test_a_manifest_cannot_choose_a_hub_id_or_path_to_load(saved, dequantised_smollm2, tmp_path):
    local = tmp_path / "smol-copy"
    shutil.copytree(dequantised_smollm2, local)
    edit_manifest(saved, lambda m: {**m, "extractor": {**m["extractor"], "model_id": str(local)}})
    with pytest.raises(ValueError, match="hub id or path.*pass it yourself"):
        DifficultyRouter.load(saved)
    edit_manifest(saved, lambda m: {**m, "extractor": {**m["extractor"], "model_id": "evil/model"}})
    with pytest.raises(ValueError, match="pass it yourself"):
        DifficultyRouter.load(saved)


def test_another_extractor_than_the_saved_one_needs_the_allow_flag_and_still_the_same_weights(
    saved, dequantised_smollm2, tmp_path
):
    local = tmp_path / "smol-copy"
    shutil.copytree(dequantised_smollm2, local)
    with pytest.raises(ValueError, match="allow_other_extractor"):
        DifficultyRouter.load(saved, model=str(local))
    with pytest.raises(ValueError, match="weights sha256"):  # allowed by name, refused by hash: other files
        DifficultyRouter.load(saved, model=str(local), allow_other_extractor=True)
    assert main(["route", "--router", str(saved), "--extractor", str(local), "hi"]) == 2


HUB_SCRIPT = """
import sys
from difficulty_router import ActivationExtractor
from difficulty_router.extraction.model_store import weights_fingerprint, hub_snapshot
extractor = ActivationExtractor("acme/smol", layers=1)
print(extractor.model_hash)
print(weights_fingerprint(hub_snapshot("acme/smol")))
"""


def fake_hub_cache(root: Path, weights: Path) -> Path:
    """A Hugging Face cache holding ``acme/smol`` at one revision, laid out as the hub client writes it;
    the files are the real SmolLM2 weights (links, as the client's blobs are)."""
    snapshot = root / "models--acme--smol" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for item in weights.iterdir():
        (snapshot / item.name).symlink_to(item)
    (root / "models--acme--smol" / "refs").mkdir()
    (root / "models--acme--smol" / "refs" / "main").write_text("0" * 40)
    return snapshot


def test_a_hub_model_is_fingerprinted_by_its_weights_not_its_name(dequantised_smollm2, tmp_path):
    """Runs in a subprocess so the hub client reads the test's cache and offline mode from the start."""
    weights = dequantised_smollm2
    snapshot = fake_hub_cache(tmp_path / "hub", weights)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", HUB_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    model_hash, expected = out.stdout.split()[-2:]
    assert model_hash == expected and len(model_hash) == 64 and not model_hash.startswith("hub:")
    digest = hashlib.sha256()
    digest.update(b"model.safetensors")
    digest.update(hashlib.sha256((weights / "model.safetensors").read_bytes()).hexdigest().encode())
    assert model_hash == digest.hexdigest()
    # other weights under the same id: another fingerprint
    (snapshot / "model.safetensors").unlink()
    tampered = tmp_path / "model.safetensors"
    data = bytearray((weights / "model.safetensors").read_bytes())
    data[-1] ^= 1
    tampered.write_bytes(bytes(data))
    (snapshot / "model.safetensors").symlink_to(tampered)
    out = subprocess.run([sys.executable, "-c", HUB_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2] != model_hash


@pytest.fixture
def pik_bundle(tmp_path, trained_router) -> Path:
    from difficulty_router.learning.probes import SuccessProbe

    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, trained_router.extractor.hidden_size))
    probe = SuccessProbe(cv=2).fit(X, (X[:, 0] > 0).astype(float), names=["self"])
    pik = PIKProbe(probe, layers=[15], pooling="last", model_hash=trained_router.extractor.model_hash)
    return pik.save(tmp_path / "pik")


def test_a_pik_bundle_is_hash_checked(pik_bundle):
    from safetensors.numpy import load_file, save_file

    assert PIKProbe.load(pik_bundle).layers == (15,)
    arrays = load_file(str(pik_bundle / "pik.safetensors"))
    arrays["pik.coef"] = -arrays["pik.coef"]  # the probe now says the opposite
    save_file(arrays, str(pik_bundle / "pik.safetensors"))
    with pytest.raises(ValueError, match="altered"):
        PIKProbe.load(pik_bundle)


def test_a_pik_manifest_without_a_hash_or_with_bad_fields_is_refused(pik_bundle):
    meta = json.loads((pik_bundle / "pik.json").read_text())
    (pik_bundle / "pik.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "arrays_sha256"}))
    with pytest.raises(ValueError, match="'arrays_sha256' is missing"):
        PIKProbe.load(pik_bundle)
    (pik_bundle / "pik.json").write_text(json.dumps({**meta, "layers": "15"}))
    with pytest.raises(ValueError, match="'layers' must be list"):
        PIKProbe.load(pik_bundle)
    (pik_bundle / "pik.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        PIKProbe.load(pik_bundle)
