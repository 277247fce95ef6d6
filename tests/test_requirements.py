"""CI's floor job pins the oldest release each range of requirements*.txt admits (.ci/floors.txt), so that a
widened or raised range cannot leave it testing another release."""
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def lines(name: str) -> list[str]:
    return [line.split("#")[0].strip() for line in (ROOT / name).read_text().splitlines()
            if line.split("#")[0].strip() and not line.startswith("-r")]


def requirements() -> dict[str, Requirement]:
    names = ("requirements.txt", "requirements-dev.txt", "requirements-page.txt")
    reqs = [Requirement(line) for name in names for line in lines(name)]
    return {canonicalize_name(r.name): r for r in reqs}


def test_every_requirement_has_a_pin_its_range_admits():
    floors = ".ci/floors.txt"
    pins = {canonicalize_name(r.name): r for r in map(Requirement, lines(floors))}
    reqs = requirements()
    assert pins.keys() == reqs.keys()
    for name, pin in pins.items():
        (spec,) = pin.specifier
        assert spec.operator == "==" and Version(spec.version) in reqs[name].specifier, (floors, name)


def test_the_numpy_1_floors_are_each_ranges_lowest_release():
    pins = {canonicalize_name(r.name): Version(next(iter(r.specifier)).version)
            for r in map(Requirement, lines(".ci/floors.txt"))}
    for name, req in requirements().items():
        (low,) = [Version(s.version) for s in req.specifier if s.operator == ">="]
        # torch>=2.1 is floored by 2.1.0, ipykernel>=6.3.1 by 6.3.1
        assert pins[name].release[:len(low.release)] == low.release, (name, pins[name], low)
