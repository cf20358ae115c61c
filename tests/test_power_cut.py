"""Power-cut matrix on the simulated device (MicroPython unix port + NOR flash simulator):
an update (upload, test boot, confirm) and a revert (a test image that never confirms), cut
at every flash operation and torn inside writes and erases, rebooted after every cut.
Exhaustive for one layout; sampled over write alignments 1/4/8/16 and 4 KiB/128 KiB sectors."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from mpboot.keys import SigningKey
from mpboot.sim import Geometry, SimDevice
from powercut import Matrix, Scenario, Step, run_step, sample, summary
from simkit import boot, installed, make_app, sign_app


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, rsa2048: SigningKey) -> dict[str, Path]:
    """v1 and v2 confirm themselves; v3 never does. Each spans two 4 KiB sectors."""
    out = tmp_path_factory.mktemp("images")
    made = {}
    for version, confirm in (("1.0.0", True), ("2.0.0", True), ("3.0.0", False)):
        romfs = make_app(out / f"app-{version}", version, confirm=confirm, filler=4500)
        path = out / f"v{version}.bin"
        path.write_bytes(sign_app(romfs, rsa2048, version))
        made[version] = path
    return made


def scenarios(images: dict[str, Path]) -> tuple[Scenario, Scenario]:
    update = Scenario("update", (Step("install", images["2.0.0"]), Step("boot"), Step("boot")),
                      "1.0.0", "2.0.0")
    revert = Scenario("revert", (Step("install", images["3.0.0"]), Step("boot"), Step("boot")),
                      "2.0.0", "3.0.0")
    return update, revert


def prepared(work: Path, lib: Path, geometry: Geometry, images: dict[str, Path],
             free: tuple[int, int]) -> tuple[SimDevice, Matrix, Matrix]:
    """A device running a confirmed v1, and the traced update and revert matrices. `free`:
    state records left in the current state sector when each scenario starts, so that a
    scenario's state change lands on a sector switch (erase, then first record)."""
    dev = SimDevice(work / "device", lib, geometry)
    installed(dev.install(images["1.0.0"], "permanent"))
    assert boot(dev).version == "1.0.0"
    update, revert = scenarios(images)
    dev.age_to(free[0])
    m_update = Matrix(dev, update, work)
    m_update.trace()
    dev.age_to(free[1])
    m_revert = Matrix(dev, revert, work)
    m_revert.trace()
    return dev, m_update, m_revert


# State records left when each scenario starts: an install writes two (its checkpoint with
# the session, the mark), so the update's first boot and the revert's second boot switch
# state sectors.
FREE = (2, 3)


def test_reference_scenarios_do_what_they_say(sim_lib: Path, images: dict[str, Path], tmp_path: Path) -> None:
    _, m_update, m_revert = prepared(tmp_path, sim_lib, Geometry(64 * 1024, 4096, 16), images, FREE)
    assert m_update.expected == [("install", "2.0.0+0"), ("boot", "2.0.0", True, "2.0.0"),
                                 ("boot", "2.0.0", False, "2.0.0")]
    assert m_revert.expected == [("install", "3.0.0+0"), ("boot", "3.0.0", True, "3.0.0"),
                                 ("boot", "2.0.0", False, "2.0.0")]
    # The state log switched sectors inside each scenario: an erase outside the install.
    assert "E" in m_update.ops[1] and "E" in m_revert.ops[2]


def test_power_cut_exhaustive(sim_lib: Path, images: dict[str, Path], tmp_path: Path, record_property) -> None:  # type: ignore[no-untyped-def]
    geometry = Geometry(64 * 1024, 4096, 16)
    dev, m_update, m_revert = prepared(tmp_path, sim_lib, geometry, images, FREE)
    counts, failures = run_matrices(dev, (m_update, m_revert))
    line = summary("", counts)
    record_property("summary", line + f" (exhaustive: update + revert, {m_update.op_count() + m_revert.op_count()} "
                    f"flash operations, align {geometry.align}, sector {geometry.sector})")
    assert not failures, "\n".join(failures[:20])
    assert counts["safe"] == sum(counts.values()) > 100


def run_matrices(dev: SimDevice, matrices: tuple[Matrix, ...], sample_size: int | None = None,
                 seed: int = 0) -> tuple[Counter[str], list[str]]:
    """Every cut point of each matrix (or `sample_size` of them): outcome counts, failures."""
    counts: Counter[str] = Counter()
    failures: list[str] = []
    for m in matrices:
        points = m.points() if sample_size is None else sample(m.points(), sample_size, seed)
        counts += m.run_points(points, dev)
        failures += m.failures
    return counts, failures


LAYOUTS = [(align, sector) for sector in (4096, 128 * 1024) for align in (1, 4, 8, 16)]


def layout(align: int, sector: int) -> Geometry:
    """The chip for a sampled layout: 64 KiB, or two one-sector slots for big sectors."""
    return Geometry(8 * sector if sector > 4096 else 64 * 1024, sector, align)


@pytest.mark.parametrize(("align", "sector"), LAYOUTS, ids=[f"align{a}-sector{s // 1024}k" for a, s in LAYOUTS])
def test_power_cut_sampled(sim_lib: Path, images: dict[str, Path], tmp_path: Path, record_property,  # type: ignore[no-untyped-def]
                           align: int, sector: int) -> None:
    geometry = layout(align, sector)
    seed = align * 1000 + sector
    free = (seed % 3, (seed // 3) % 3)
    dev, m_update, m_revert = prepared(tmp_path, sim_lib, geometry, images, free)
    counts, failures = run_matrices(dev, (m_update, m_revert), sample_size=6, seed=seed)
    record_property("summary", summary(f" (sampled, align {align}, sector {sector // 1024}K)", counts))
    assert not failures, "\n".join(failures)
    assert counts["safe"] == sum(counts.values()) == 12


@pytest.mark.slow
@pytest.mark.parametrize(("align", "sector"), LAYOUTS, ids=[f"align{a}-sector{s // 1024}k" for a, s in LAYOUTS])
def test_power_cut_exhaustive_every_layout(sim_lib: Path, images: dict[str, Path], tmp_path: Path, record_property,  # type: ignore[no-untyped-def]
                                           align: int, sector: int) -> None:
    """The soak version (make test-slow): every cut point, every layout, with the state log
    switching sectors during each scenario."""
    geometry = layout(align, sector)
    dev, m_update, m_revert = prepared(tmp_path, sim_lib, geometry, images, FREE)
    counts, failures = run_matrices(dev, (m_update, m_revert))
    record_property("summary", summary(f" (exhaustive, align {align}, sector {sector // 1024}K)", counts))
    assert not failures, "\n".join(failures[:20])
    assert counts["safe"] == sum(counts.values())


def test_an_install_cut_after_its_checkpoint_resumes_there(sim_lib: Path, images: dict[str, Path],
                                                            tmp_path: Path) -> None:
    """Cut each flash operation of an install in turn: once the checkpoint is on flash, the
    next install continues from it instead of from 0, and the image lands intact."""
    dev, m_update, _ = prepared(tmp_path, sim_lib, Geometry(64 * 1024, 4096, 16), images, FREE)
    base = m_update.snaps[0]  # the device before the update's install
    resumed = []
    for op in range(len(m_update.ops[0])):
        dev.restore(base)
        assert run_step(dev, m_update.scenario.steps[0], fault=f"cut={op}").cut
        again = run_step(dev, m_update.scenario.steps[0])
        assert installed(again) == 1 and "2.0.0" in (again.line("INSTALLED") or "")
        if again.line("RESUMED"):
            assert again.line("RESUMED") == "RESUMED at 4096"
            resumed.append(op)
    # From the cut right after the checkpoint record to the end of the install's writes.
    assert resumed and resumed == list(range(resumed[0], len(m_update.ops[0]))), resumed
