"""Text strings in the device's CBOR decoder (firmware/mpboot/cbor.py) on MicroPython: only
strict UTF-8 (RFC 3629) is accepted, as docs/PROTOCOL.md ("CBOR subset") says and as strict
decoders (cbor2, the host) read it back. MicroPython's own str(b, "utf-8") lets overlong forms,
UTF-16 surrogates and code points above U+10FFFF through; the decoder must not.

Every case runs through both of the decoder's paths (tests/device/dev_cbor.py): the one this
port takes (str() counts characters, so ASCII text needs no look) and the max() fallback of
ports built without Unicode strings. Many cases share one MicroPython run. The end-to-end
refusals (an echo, a factory label) are in test_smp_server.py and test_factory_device.py."""

from __future__ import annotations

import re
from pathlib import Path

import cbor2
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st


def text_item(raw: bytes) -> bytes:
    """A CBOR text string (major type 3) holding raw, whatever it is."""
    n = len(raw)
    if n < 24:
        head = bytes([0x60 | n])
    elif n < 0x100:
        head = bytes([0x78, n])
    else:
        head = bytes([0x79]) + n.to_bytes(2, "big")
    return head + raw


def echo_body(raw: bytes) -> bytes:
    """{"d": text}, the text's bytes as given."""
    return b"\xa1\x61d" + text_item(raw)


def strict(raw: bytes) -> str:
    """What the device must answer for {"d": raw}: CPython's strict decoder decides."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return "ERR"
    return "OK:" + raw.hex()


def device_check(device, tmp_path: Path, payloads: list[bytes]) -> list[tuple[str, str]]:
    """(fast path, fallback path) answers per payload, from one MicroPython run."""
    path = tmp_path / f"cbor-{len(payloads)}-{id(payloads)}.bin"
    path.write_bytes(b"".join(len(p).to_bytes(2, "big") + p for p in payloads))
    lines = device.run("dev_cbor", "check", path).splitlines()
    assert lines[0] == "STR_COUNTS 1"  # the unix port counts characters: the fast path is in use
    assert len(lines) == len(payloads) + 1, lines[-3:]
    return [tuple(line.split()) for line in lines[1:]]  # type: ignore[misc]


INVALID = {
    "overlong 2-byte NUL": "c080",
    "overlong 2-byte U+007F": "c1bf",
    "overlong 3-byte NUL": "e08080",
    "overlong 3-byte U+07FF": "e09fbf",
    "overlong 4-byte NUL": "f0808080",
    "overlong 4-byte U+FFFF": "f08fbfbf",
    "surrogate U+D800": "eda080",
    "surrogate U+DBFF": "edafbf",
    "surrogate U+DC00": "edb080",
    "surrogate U+DFFF": "edbfbf",
    "surrogate pair (CESU-8)": "eda0bdedb880",
    "U+110000": "f4908080",
    "U+13FFFF": "f4bfbfbf",
    "lead F5": "f5808080",
    "lead F7 (U+1FFFFF)": "f7bfbfbf",
    "5-byte form": "f888808080",
    "6-byte form": "fc8480808080",
    "byte FE": "fe",
    "byte FF": "ff",
    "truncated 2 of 2": "c3",
    "truncated 2 of 3": "e282",
    "truncated 3 of 4": "f09f98",
    "truncated, then ASCII": "e28241",
    "truncated, then a lead": "e2c3a9",
    "lead after lead": "c3c3a9",
    "stray continuation 80": "80",
    "stray continuation BF": "bf",
    "continuation after a complete sequence": "c3a9a9",
    "continuation after 3 bytes": "e282acbf",
}

VALID = {
    "empty": "",
    "U+0000": "00",
    "U+007F": "7f",
    "U+0080": "c280",
    "U+07FF": "dfbf",
    "U+0800": "e0a080",
    "U+D7FF (below the surrogates)": "ed9fbf",
    "U+E000 (above the surrogates)": "ee8080",
    "U+FFFD": "efbfbd",
    "U+FFFF": "efbfbf",
    "U+10000": "f0908080",
    "U+1F600": "f09f9880",
    "U+FFFFF (F3)": "f3bfbfbf",
    "U+100000 (F4)": "f4808080",
    "U+10FFFF": "f48fbfbf",
    "every length in one": "41c3a9e282acf09f9880",
}


def test_invalid_text_refused_valid_accepted(device, tmp_path: Path) -> None:
    """Each class of malformed sequence alone, inside ASCII text, and at the end of a longer
    (non-ASCII) text; each valid edge case alone and between ASCII."""
    cases: list[tuple[str, bytes, bool]] = []
    for table, valid in ((INVALID, False), (VALID, True)):
        for label, seq in table.items():
            raw = bytes.fromhex(seq)
            cases += [(label, raw, valid), (f"{label} in ASCII", b"ab" + raw + b"cd", valid),
                      (f"{label} after 200 bytes", "\u00e9\u20ac".encode() * 40 + raw, valid)]
    # In a map key too (a text key that is not UTF-8 is no text key at all).
    key_cases = [(f"key: {label}", b"\xa1" + text_item(bytes.fromhex(seq)) + b"\x01")
                 for label, seq in INVALID.items()]
    got = device_check(device, tmp_path, [echo_body(raw) for _, raw, _ in cases] + [p for _, p in key_cases])
    for (label, raw, valid), answers in zip(cases, got):
        want = "OK:" + raw.hex() if valid else "ERR"
        assert want == strict(raw), label  # the tables agree with CPython
        assert answers == (want, want), label
    for (label, _), answers in zip(key_cases, got[len(cases):]):
        assert answers == ("ERR", "ERR"), label


def _overlong(cp: int, length: int) -> bytes:
    """cp encoded in `length` bytes, longer than it needs (2-4)."""
    lead = {2: 0xC0, 3: 0xE0, 4: 0xF0}[length]
    out = [0x80 | (cp >> 6 * i) & 0x3F for i in range(length - 1)][::-1]
    return bytes([lead | cp >> 6 * (length - 1)] + out)


def _four_byte(cp: int) -> bytes:
    """The 4-byte form of cp (up to U+1FFFFF: above U+10FFFF too)."""
    return bytes([0xF0 | cp >> 18, 0x80 | (cp >> 12) & 0x3F, 0x80 | (cp >> 6) & 0x3F, 0x80 | cp & 0x3F])


_PIECES = st.one_of(
    st.text(max_size=4).map(lambda s: s.encode("utf-8", "surrogatepass")),  # valid (surrogates too)
    st.characters(min_codepoint=0x80).map(lambda c: c.encode("utf-8", "surrogatepass")),
    st.integers(0xD800, 0xDFFF).map(lambda cp: chr(cp).encode("utf-8", "surrogatepass")),
    st.integers(0, 0x7F).map(lambda cp: _overlong(cp, 2)),
    st.integers(0, 0x7FF).map(lambda cp: _overlong(cp, 3)),
    st.integers(0, 0xFFFF).map(lambda cp: _overlong(cp, 4)),
    st.integers(0x10000, 0x1FFFFF).map(_four_byte),
    st.characters(min_codepoint=0x80).map(lambda c: c.encode("utf-8", "surrogatepass")[:-1]),  # truncated
    st.integers(0x80, 0xFF).map(lambda b: bytes([b])),  # stray continuation or lone lead
    st.binary(max_size=6),
)
_TEXTS = st.lists(_PIECES, max_size=8).map(b"".join)


# No shrinking: each step would be a MicroPython run (minutes), and the failing bytes are in the
# assertion message already.
@settings(max_examples=25, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(_TEXTS, min_size=50, max_size=200))
def test_agrees_with_cpythons_strict_decoder(device, tmp_path: Path, texts: list[bytes]) -> None:
    """Byte strings built from valid sequences, surrogates, overlong and oversized forms,
    truncated sequences and random bytes: the device accepts exactly those CPython's strict
    decoder accepts, and decodes them to the same text. Each example is one MicroPython run."""
    got = device_check(device, tmp_path, [echo_body(t) for t in texts])
    for raw, answers in zip(texts, got):
        want = strict(raw)
        assert answers == (want, want), raw.hex()


def test_decode_cost(device, tmp_path: Path, record_property) -> None:
    """The check's cost: an upload request of 2 KiB (bytes: only its keys are text) and 2 KiB
    echoes of ASCII (the fast path) and of 2- to 4-byte characters (the byte loop)."""
    def upload(n: int) -> bytes:
        return cbor2.dumps({"off": 123456, "data": bytes(n)})

    payloads = {"upload": upload(2040 - (len(upload(2000)) - 2000)),
                "ascii": cbor2.dumps({"d": "x" * 2030}),
                "2-byte": cbor2.dumps({"d": "\u00e9" * 1015}),
                "3-byte": cbor2.dumps({"d": "\u20ac" * 677}),
                "4-byte": cbor2.dumps({"d": "\U0001F600" * 508})}
    assert len(payloads["upload"]) == 2040
    path = tmp_path / "bench.bin"
    path.write_bytes(b"".join(len(p).to_bytes(2, "big") + p for p in payloads.values()))
    lines = device.run("dev_cbor", "bench", 500, path).splitlines()
    us = {}
    for name, line in zip(payloads, lines, strict=True):
        m = re.fullmatch(r"BENCH \d+ us=([\d.]+)", line)
        assert m, line
        us[name] = float(m.group(1))
    record_property("summary", "cbor decode of 2 KiB payloads (MicroPython unix port): "
                    + ", ".join(f"{k} {v:.1f} us" for k, v in us.items()))
    assert us["ascii"] < 10 * us["upload"] + 50  # the fast path: no per-byte loop in Python
