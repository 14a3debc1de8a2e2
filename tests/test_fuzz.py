"""Fuzz: randomly corrupted checkpoints never crash `lrcompress inspect`.

Every case must end in exit code 0 (the damage hit tensor data only) or 2 (a clear message), never
an internal error (3), an uncaught exception or a traceback. Seeded, so failures reproduce.
"""

from __future__ import annotations

import json
import random
import struct

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from lrcompress.cli import main

from .conftest import tiny_resnet

N_CASES = 240


def _corrupt(data: bytes, rng: random.Random, kind: str) -> bytes:
    b = bytearray(data)
    if kind == "bitflip":
        for _ in range(rng.randint(1, 24)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        return bytes(b)
    if kind == "truncate":
        return bytes(b[: rng.randrange(len(b))])
    if kind == "head":  # overwrite bytes near the start (headers, zip local entries)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(min(len(b), 4096))
            b[i] = rng.randrange(256)
        return bytes(b)
    if kind == "splice":  # a block of random bytes somewhere
        i = rng.randrange(len(b))
        n = rng.randint(1, 64)
        b[i:i + n] = bytes(rng.randrange(256) for _ in range(n))
        return bytes(b)
    raise ValueError(kind)


def _random_safetensors_header(rng: random.Random) -> bytes:
    entries = {}
    for k in range(rng.randint(0, 4)):
        start = rng.randint(0, 64)
        entries[f"t{k}"] = {"dtype": rng.choice(["F32", "F16", "I64", "XX", 5]),
                            "shape": [rng.randint(-2, 2**40) for _ in range(rng.randint(0, 3))],
                            "data_offsets": [start, start + rng.randint(-8, 2**40)]}
    raw = json.dumps(entries).encode()
    claimed = rng.choice([len(raw), len(raw) + 7, 2**63, 0])
    return struct.pack("<Q", claimed % 2**64) + raw + bytes(rng.randint(0, 64))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz-src")
    sd = tiny_resnet().state_dict()
    pt = d / "a.pt"
    torch.save(sd, pt)
    st = d / "a.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    return {".pt": pt.read_bytes(), ".safetensors": st.read_bytes()}


def test_corrupted_checkpoints_never_crash(sources, tmp_path):
    rng = random.Random(1234)
    runner = CliRunner()
    outcomes = {0: 0, 2: 0}
    for case in range(N_CASES):
        suffix = rng.choice([".pt", ".safetensors"])
        kind = rng.choice(["bitflip", "truncate", "head", "splice", "header"])
        if kind == "header":
            suffix = ".safetensors"
            data = _random_safetensors_header(rng)
        else:
            data = _corrupt(sources[suffix], rng, kind)
        p = tmp_path / f"case{case}_test_resnet{suffix}"
        p.write_bytes(data)
        r = runner.invoke(main, ["inspect", str(p), "--arch", "timm:test_resnet",
                                 "--input-size", "1,16,16", "--json"], obj={})
        detail = f"case {case} ({kind}, {suffix}): exit {r.exit_code}\n{r.output[-800:]}"
        assert r.exit_code in (0, 2), detail
        assert "Traceback" not in r.output, detail
        if r.exit_code == 2:
            assert r.output.strip(), detail  # a message, not silence
        outcomes[r.exit_code] += 1
        p.unlink()
    assert outcomes[2] >= N_CASES // 2  # most corruptions are caught, not silently accepted
