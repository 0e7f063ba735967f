"""The Dockerfile, read statically (no Docker engine here): it installs the picker from the repo,
runs it as the non-root user the manifests expect, and exposes the ports they use; its `vllm-sim`
target does the same for the simulator; neither image carries the load-test harness."""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib

from rendered import GATEWAY, OVERLAYS, ROOT, container, one, pod, ports, render

Instruction = tuple[str, str]  # (keyword, arguments)


def instructions() -> list[Instruction]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (keyword.upper(), rest.strip())
        for keyword, _, rest in (line.partition(" ") for line in lines if line and not line.startswith("#"))
    ]


def stages() -> list[list[Instruction]]:
    found: list[list[Instruction]] = []
    for keyword, rest in instructions():
        if keyword == "FROM":
            found.append([])
        found[-1].append((keyword, rest))
    return found


def stage(name: str) -> list[Instruction]:
    """The stage `FROM ... AS name`."""
    (found,) = [s for s in stages() if s[0][1].split()[-1] == name]
    return found


def copied_sources(instructions: list[Instruction]) -> set[str]:
    """What COPY instructions take from the build context (not from other stages)."""
    copied = [
        rest.split()[:-1]
        for keyword, rest in instructions
        if keyword == "COPY" and not rest.startswith("--from")
    ]
    return {source.rstrip("/") for group in copied for source in group}


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_slim_python_base_the_package_supports():
    required = re.fullmatch(r">=(\d+)\.(\d+)", pyproject()["project"]["requires-python"])
    assert required
    for stage in stages():
        image = stage[0][1].split()[0]
        match = re.fullmatch(r"python:(\d+)\.(\d+)-slim", image)
        assert match, image
        assert tuple(map(int, match.groups())) >= tuple(map(int, required.groups()))


def test_runs_picker_serve_as_the_manifests_non_root_user():
    final = stages()[-1]
    (user,) = [rest for keyword, rest in final if keyword == "USER"]
    assert user.isdigit() and int(user) != 0
    assert any(keyword == "RUN" and f"--uid {user}" in rest for keyword, rest in final)
    for directory in OVERLAYS:
        picker = container(one(render(directory), "Deployment", "picker"), "picker")
        assert picker["securityContext"]["runAsUser"] == int(user)

    (entrypoint,) = [rest for keyword, rest in final if keyword == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["picker", "serve"]
    assert "picker" in pyproject()["project"]["scripts"]


def test_simulator_target_runs_what_the_simulated_pods_run():
    target = stage("vllm-sim")
    sim = pod(one(render(GATEWAY / "vllm-sim"), "Deployment"))["containers"][0]
    (user,) = [rest for keyword, rest in target if keyword == "USER"]
    assert sim["securityContext"]["runAsUser"] == int(user) != 0
    (entrypoint,) = [rest for keyword, rest in target if keyword == "ENTRYPOINT"]
    assert json.loads(entrypoint) == sim["command"] == ["python", "-m", "vllm_sim"]
    assert sim["image"].split(":")[0].endswith("vllm-sim")
    (exposed,) = [rest for keyword, rest in target if keyword == "EXPOSE"]
    assert [int(exposed)] == list(ports(sim).values())


def test_exposes_the_ports_the_deployment_uses():
    (exposed,) = [rest for keyword, rest in stages()[-1] if keyword == "EXPOSE"]
    picker = container(one(render(OVERLAYS[0]), "Deployment", "picker"), "picker")
    assert sorted(map(int, exposed.split())) == sorted(ports(picker).values())


def test_installs_the_repository_from_its_own_sources_only():
    text = (ROOT / "Dockerfile").read_text()
    assert "://" not in text and "index-url" not in text
    runs = [rest for keyword, rest in instructions() if keyword == "RUN"]
    assert any(re.search(r"pip install \.(\s|$)", run) for run in runs)
    sources = copied_sources(instructions())
    for source in sources:
        assert (ROOT / source).exists(), source
        assert _docker_context_includes(source), f"{source} is excluded by .dockerignore"
    packages = {
        p.name
        for pattern in pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
        for p in ROOT.iterdir()
        # packages only: an editable install leaves picker.egg-info beside them
        if (p / "__init__.py").is_file() and fnmatch.fnmatch(p.name, pattern)
    }
    assert {"picker", "vllm_sim", "loadtest"} <= packages
    # The images carry the picker and the simulator, never the harness or the tests.
    assert packages & sources == {"picker", "vllm_sim"}
    assert not _docker_context_includes("loadtest") and not _docker_context_includes("tests")


def test_each_image_is_built_from_its_own_package_only():
    """The picker image holds no simulator; the simulator image none of the picker's code or
    dependencies (only the `sim` extra of pyproject.toml)."""
    picker_build, sim_build = stage("build"), stage("sim-build")
    metadata = {"pyproject.toml", pyproject()["project"]["readme"]}
    assert copied_sources(picker_build) == metadata | {"picker"}
    assert copied_sources(sim_build) == metadata | {"vllm_sim"}
    assert [rest for keyword, rest in stage("picker") if keyword == "COPY"] == [
        "--from=build /opt/picker /opt/picker"
    ]
    assert [rest for keyword, rest in stage("vllm-sim") if keyword == "COPY"] == [
        "--from=sim-build /opt/vllm-sim /opt/vllm-sim"
    ]
    (sim_install,) = [rest for keyword, rest in sim_build if keyword == "RUN" and "pip install" in rest]
    assert "['optional-dependencies']['sim']" in sim_install and "--no-deps ." in sim_install


def _docker_context_includes(path: str) -> bool:
    """.dockerignore semantics for top-level paths: the last matching rule wins."""
    included = True
    for rule in (ROOT / ".dockerignore").read_text().splitlines():
        rule = rule.strip()
        if not rule or rule.startswith("#"):
            continue
        negated = rule.startswith("!")
        if fnmatch.fnmatch(path, rule.removeprefix("!").rstrip("/")):
            included = negated
    return included
