"""Check the release artefacts in a dist directory: the wheel is abi3 for Python >= 3.10 and
tagged manylinux2014 (glibc 2.17), and `auditwheel show` agrees from the symbol versions it
needs; the sdist holds every tracked file a build needs. Run: python scripts/check_dist.py dist
(needs auditwheel; `make wheel` runs it)."""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_GLIBC = (2, 17)
WHEEL_TAGS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64")
# What `pip wheel` on the sdist reads, besides every tracked file under rust/ and python/.
SDIST_FILES = ("Cargo.toml", "Cargo.lock", "pyproject.toml", "README.md", "LICENSE", "PKG-INFO")


def check_wheel(wheel: Path) -> list[str]:
    """Problems with the wheel's tags and the glibc symbol versions it references."""
    problems = []
    name = wheel.name
    if "-cp310-abi3-" not in name:
        problems.append(f"{name}: not an abi3 wheel for cp310+")
    if not any(tag in name for tag in WHEEL_TAGS):
        problems.append(f"{name}: platform tag is not manylinux2014 / manylinux_2_17_x86_64")
    shown = subprocess.run(
        [sys.executable, "-m", "auditwheel", "show", str(wheel)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    text = " ".join(shown.split())
    consistent = re.search(r'consistent with the following platform tag: "([^"]+)"', text)
    if consistent is None:
        problems.append(f"auditwheel show: no platform tag in its output:\n{shown}")
    elif consistent.group(1) != "manylinux_2_17_x86_64":
        problems.append(f"auditwheel: consistent only with {consistent.group(1)}, not 2_17")
    versions = [tuple(map(int, v.split("."))) for v in re.findall(r"GLIBC_([\d.]+\d)", text)]
    if not versions:
        problems.append(f"auditwheel show: no GLIBC symbol versions listed:\n{shown}")
    elif max(versions)[:2] > MAX_GLIBC:
        newest = ".".join(map(str, max(versions)))
        problems.append(f"{name} needs GLIBC_{newest}, newer than 2.17")
    else:
        print(f"{name}: newest glibc symbol GLIBC_{'.'.join(map(str, max(versions)))}")
    return problems


def check_sdist(sdist: Path) -> list[str]:
    """Files a build from the sdist needs that the sdist lacks."""
    with tarfile.open(sdist) as archive:
        names = archive.getnames()
    top = names[0].split("/", 1)[0]
    members = {n.split("/", 1)[1] for n in names if "/" in n}
    tracked = subprocess.run(
        ["git", "ls-files", "rust", "python"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    if not tracked:
        return ["git ls-files rust python: nothing tracked (not run from the repository?)"]
    needed = [*SDIST_FILES, *tracked]
    return [f"{sdist.name}: missing {top}/{path}" for path in needed if path not in members]


def single(dist: Path, pattern: str) -> Path:
    """The one file in dist matching pattern (several mean a stale build is lying around)."""
    found = sorted(dist.glob(pattern))
    if len(found) != 1:
        sys.exit(f"expected one {pattern} in {dist}, found {[f.name for f in found]}")
    return found[0]


def main() -> None:
    dist = Path(sys.argv[1] if len(sys.argv) > 1 else "dist")
    wheel = single(dist, "depeche_rs-*.whl")
    sdist = single(dist, "depeche_rs-*.tar.gz")
    problems = check_wheel(wheel) + check_sdist(sdist)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f"{wheel.name} and {sdist.name}: tags, glibc symbols and sdist contents are right")


if __name__ == "__main__":
    main()
