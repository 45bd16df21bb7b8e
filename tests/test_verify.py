"""`dimcut verify`: a complete output passes; damaged shards, configs and stray weight files fail."""

from __future__ import annotations

import json

import pytest

from helpers import run_cli, slice_args


def test_verify_catches_damaged_outputs(pristine, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(slice_args(pristine, out), capsys)[0] == 0
    code, output = run_cli(["verify", out], capsys)
    assert code == 0 and "PASS" in output and "SHA-256 match" in output

    data = bytearray((out / "model.safetensors").read_bytes())
    data[-3] ^= 0x40  # one flipped bit in the last tensor: headers still parse
    (out / "model.safetensors").write_bytes(bytes(data))
    code, output = run_cli(["verify", out], capsys)
    assert code == 1 and "model.safetensors: SHA-256" in output

    data[-3] ^= 0x40
    (out / "model.safetensors").write_bytes(bytes(data))
    config = json.loads((out / "config.json").read_text())
    config["mid_widths"][0] -= 8
    (out / "config.json").write_text(json.dumps(config))
    code, output = run_cli(["verify", out, "--allow-missing-manifest"], capsys)
    assert code == 1 and "FAIL  shapes" in output and "config expects" in output

    (out / "model.safetensors").write_bytes(bytes(data[:-10]))
    code, output = run_cli(["verify", out], capsys)
    assert code == 1 and "FAIL  headers" in output and "truncated" in output


@pytest.mark.parametrize("stray", ["tf_model.h5", "flax_model.msgpack", "pytorch_model.bin"])
def test_verify_refuses_a_weight_file_the_manifest_does_not_list(stray, pristine, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(slice_args(pristine, out), capsys)[0] == 0
    (out / stray).write_bytes(b"unsliced weights")
    code, output = run_cli(["verify", out], capsys)
    assert code == 1 and f"{stray}: weight file not in the manifest" in output
