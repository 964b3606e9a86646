"""The Tiltfile's image build context, assembled as Tilt and Docker would send it, builds.

Tilt's ``docker_build(..., only=[...])`` sends only those paths, and Docker then drops what
``.dockerignore`` matches. Both Dockerfiles run ``cargo build --locked`` on that context, so the
workspace must load from it: every member present, the lock file unchanged. No Docker engine is
needed: the context is copied into a temporary directory and ``cargo metadata --locked
--offline`` runs there, and every file the crates embed at compile time must be in it too.
"""

import ast
import os
import pathlib
import re
import shutil
import subprocess
import tomllib


ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCKERFILES = ["operator/Dockerfile", "gateway/Dockerfile"]


def tiltfile_sources() -> list[str]:
    """The `sources = [...]` list the Tiltfile passes as `only=` to both docker_build calls."""
    text = (ROOT / "Tiltfile").read_text()
    match = re.search(r"^sources\s*=\s*(\[[^\]]*\])", text, re.MULTILINE)
    assert match, "the Tiltfile no longer defines `sources = [...]`"
    builds = re.findall(r"docker_build\(([^)]*)\)", text)
    assert len(builds) == len(DOCKERFILES), builds
    for build, dockerfile in zip(builds, DOCKERFILES):
        assert f"dockerfile='{dockerfile}'" in build and "only=sources" in build, build
    return ast.literal_eval(match.group(1))


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus `**`), matched against a relative path."""
    out, i = "", 0
    pattern = pattern.strip("/")
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def ignored(relative: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a path is excluded when it or a parent
    directory matches an exclusion."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = pattern_regex(pattern.lstrip("!"))
        if any(regex.fullmatch(p) for p in prefixes):
            excluded = not negate
    return excluded


def assemble(destination: pathlib.Path) -> list[str]:
    """Copies the build context into `destination`; returns the files sent."""
    patterns = dockerignore_patterns()
    sent = []
    for source in tiltfile_sources():
        top = ROOT / source
        assert top.exists(), f"the Tiltfile sends {source}, which does not exist"
        files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        for path in files:
            relative = path.relative_to(ROOT).as_posix()
            if ignored(relative, patterns):
                continue
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
            sent.append(relative)
    return sent


def cargo_metadata(context: pathlib.Path) -> subprocess.CompletedProcess[str]:
    """`cargo metadata --locked --offline` in the context: the workspace loads, every member is
    there and the lock file needs no change (what `cargo build --locked` checks first). Only the
    host's packages are resolved, which the cargo cache holds after a build."""
    host = next(line.split()[1] for line in subprocess.run(["rustc", "-vV"], check=True, capture_output=True,
                                                           text=True).stdout.splitlines() if line.startswith("host:"))
    env = dict(os.environ, CARGO_TARGET_DIR=str(context / "target"))
    return subprocess.run(["cargo", "metadata", "--locked", "--offline", "--format-version", "1",
                           "--filter-platform", host], cwd=context, env=env, capture_output=True, text=True)


def test_dockerignore_matching_follows_docker_rules() -> None:
    patterns = ["target", "**/target", "**/node_modules", "*.log", "!keep.log"]
    assert ignored("target/debug/x", patterns)
    assert ignored("gateway/target/x", patterns)
    assert ignored("tests/js/node_modules/ws/index.js", patterns)
    assert ignored("run.log", patterns)
    assert not ignored("keep.log", patterns)
    assert not ignored("gateway/src/targets.rs", patterns)
    assert not ignored("gateway/run.log", patterns), "a root-level `*.log` does not reach subdirectories"


def test_tilt_build_context_loads_the_locked_workspace_offline(tmp_path: pathlib.Path) -> None:
    sent = assemble(tmp_path)
    assert "Cargo.lock" in sent and "Cargo.toml" in sent
    assert not [f for f in sent if "/node_modules/" in f or f.startswith("target/")], "ignored files were sent"
    members = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["members"]
    for member in members:
        assert (tmp_path / member / "Cargo.toml").is_file(), f"workspace member {member} is not in the Tilt build context"
    lock_before = (tmp_path / "Cargo.lock").read_bytes()
    result = cargo_metadata(tmp_path)
    assert result.returncode == 0, f"cargo metadata failed on the Tilt build context:\n{result.stderr}"
    assert (tmp_path / "Cargo.lock").read_bytes() == lock_before
    assert "confab-gateway" in result.stdout and "confab-operator" in result.stdout


# Files the crates read at compile time, by the macro and the path it is given.
EMBED = re.compile(r'(include_str|include_bytes)!\(\s*"([^"]+)"\s*\)|sqlx::migrate!\(\s*"([^"]+)"\s*\)')


def test_every_file_the_images_compile_in_is_in_the_build_context(tmp_path: pathlib.Path) -> None:
    assemble(tmp_path)
    checked = 0
    for crate in ["gateway", "operator"]:
        for source in (ROOT / crate / "src").rglob("*.rs"):
            for macro, path, migrations in EMBED.findall(source.read_text()):
                relative = source.relative_to(ROOT)
                if migrations:
                    # sqlx resolves migration directories from the crate root.
                    needed = (tmp_path / crate / migrations)
                else:
                    needed = (tmp_path / relative).parent / path
                assert needed.exists(), f"{relative} embeds {path or migrations}, missing from the Tilt build context"
                checked += 1
    assert checked >= 5, "the embed scan found nothing: has the pattern gone stale?"


def test_the_build_context_without_a_member_is_refused(tmp_path: pathlib.Path) -> None:
    """The check above would catch the original defect: `bench/` left out of `only=`."""
    assemble(tmp_path)
    shutil.rmtree(tmp_path / "bench")
    result = cargo_metadata(tmp_path)
    assert result.returncode != 0
    assert "bench" in result.stderr, result.stderr
