"""Mutated images: the host parser never fails other than by ImageRejected, and the device
and host verifiers reach the same verdict and code on every mutant. A short run is part of
the default suite; `make test-slow` runs the long one (marker `slow`)."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import VECTORS, trusted_public_keys
from mpboot.errors import ImageRejected
from mpboot.image import parse_image, verify_image

SEEDS = ("ok-rsa2048-pss.bin", "ok-rsa3072-pss.bin", "ok-pubkey-tlv.bin", "ok-untrusted-then-trusted.bin")


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    choice = rng.randrange(5)
    if choice == 0:  # overwrite a few bytes anywhere
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif choice == 1:  # truncate
        del b[rng.randrange(len(b)):]
    elif choice == 2:  # a header field set to an edge value
        off, fmt = rng.choice([(8, "<H"), (10, "<H"), (12, "<I"), (16, "<I")])
        struct.pack_into(fmt, b, off, rng.choice([0, 1, 4, 31, 32, 0xFFFF, 0xFFFFFFFF & ((1 << (8 * struct.calcsize(fmt))) - 1)]))
    elif choice == 3:  # append junk (a bogus trailing TLV or erased flash)
        b += rng.choice([b"\xff" * rng.randint(1, 64), bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))])
    else:  # splice: a TLV length byte
        pos = rng.randrange(max(1, len(b) - 300), len(b))
        b[pos] = rng.randrange(256)
    return bytes(b)


def _host_verdict(data: bytes, slot: int) -> tuple[bool, int]:
    try:
        verify_image(data, trusted_public_keys(), slot)
    except ImageRejected as err:
        return False, int(err.code)
    return True, 0


def _agree(device, tmp_path, count: int, seed: int) -> None:
    rng = random.Random(seed)
    seeds = [(VECTORS / name).read_bytes() for name in SEEDS]
    items, mutants = [], []
    for i in range(count):
        data = _mutate(rng, rng.choice(seeds))
        slot = max(len(data), 64) + rng.choice([0, 0, 16, 4096])
        p = tmp_path / f"m{i}.bin"
        p.write_bytes(data)
        items.append((p, slot))
        mutants.append((data, slot))
    verdicts = device.verify_files(items)
    disagreements = []
    for (data, slot), (p, _), v in zip(mutants, items, verdicts):
        host = _host_verdict(data, slot)
        if host != (v.accepted, v.code):
            disagreements.append((p.name, host, (v.accepted, v.code)))
    assert not disagreements


def test_device_and_host_agree_on_mutants_smoke(device, tmp_path) -> None:
    _agree(device, tmp_path, 300, seed=1)


@pytest.mark.slow
def test_device_and_host_agree_on_mutants_long(device, tmp_path) -> None:
    for seed in range(20):
        _agree(device, tmp_path, 1000, seed=100 + seed)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_host_parser_fails_only_by_rejection(data) -> None:
    image = bytearray((VECTORS / data.draw(st.sampled_from(SEEDS))).read_bytes())
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(st.integers(0, len(image) - 1))
        image[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(image)))
    mutated = bytes(image[:cut])
    for fn in (lambda: parse_image(mutated), lambda: verify_image(mutated, trusted_public_keys(), None)):
        try:
            fn()
        except ImageRejected:
            pass
