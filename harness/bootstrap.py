"""First-use set-up for ./check: Debian packages and the project venv.

Runs under the system python3 with the standard library only, before any
dependency exists.  Installs what is missing (apt-get as root; the Python
packages of pyproject.toml into .venv), then hands over to the venv's python.
"""

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, ".venv")
VENV_PYTHON = os.path.join(VENV, "bin", "python")
STAMP = os.path.join(VENV, ".stackcheck-deps")
SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin"
# What the set-up could not install, and why ("package: reason" lines), for the
# tests that need it: a skip names the reason, never only the missing program.
NOT_INSTALLED = "STACKCHECK_NOT_INSTALLED"


def say(message):
    print(f"stackcheck: {message}", file=sys.stderr, flush=True)


def _project():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


@functools.cache
def _apt_update():
    """Once a run: a fresh machine's package lists are empty or stale."""
    subprocess.run(["apt-get", "update", "-qq"], env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"),
                   stdout=subprocess.DEVNULL, check=False)


def _apt_install(packages):
    """None once packages are installed, else why not (apt-get's last word)."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    say(f"installing Debian packages: {' '.join(packages)}")
    _apt_update()
    done = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if not done.returncode:
        return None
    # Not fatal: cases that need a missing tool report "not run" with the reason.
    why = f"apt-get install failed ({done.returncode}): " + " ".join(done.stderr.strip().splitlines()[-1:])
    say(why)
    return why


def wanted_packages(project, argv):
    """[{tool on PATH or absolute path: Debian package}]: the cases' table, and for
    --self-test also the packages only stackcheck's own tests need, installed apart
    so that one of them missing from the archive keeps none of the cases' tools out."""
    config = project["tool"]["stackcheck"]
    cases = dict(config["debian-packages"])
    # Debian's own python3 keeps its C headers (for building pyfuse3) in python3-dev.
    cases[os.path.join(sysconfig.get_paths()["include"], "Python.h")] = "python3-dev"
    return [cases, dict(config["self-test-packages"])] if "--self-test" in argv else [cases]


def ensure_debian_packages(wanted):
    """Install what wanted ({tool or path: package}) misses; {package: why not} for
    what is still missing."""
    path = os.environ.get("PATH", "") + ":" + SBIN_PATH

    def present(what):
        return os.path.exists(what) if what.startswith("/") else shutil.which(what, path=path)

    def missing():
        return sorted({pkg for what, pkg in wanted.items() if not present(what)})
    if not missing():
        return {}
    why = _apt_install(missing()) if shutil.which("apt-get") else "no apt-get on this machine"
    return {pkg: why or "apt-get installed it, yet its program is not there" for pkg in missing()}


def why_not_installed(package):
    """Why ./check's set-up left package uninstalled in this run (for a test's skip)."""
    if NOT_INSTALLED not in os.environ:
        return "these tests did not start from ./check --self-test, whose set-up installs it"
    for line in os.environ[NOT_INSTALLED].splitlines():
        name, _, why = line.partition(": ")
        if name == package:
            return why
    return "./check's set-up did not try: no table of pyproject.toml's [tool.stackcheck] names it"


def ensure_venv(project):
    deps = project["project"]["dependencies"]
    digest = hashlib.sha256("\n".join(deps + [sys.version]).encode()).hexdigest()
    try:
        with open(STAMP) as f:
            if f.read().strip() == digest and os.path.exists(VENV_PYTHON):
                return
    except FileNotFoundError:
        pass
    say(f"creating the project venv in {os.path.relpath(VENV)}")
    if subprocess.run([sys.executable, "-m", "venv", "--clear", VENV], stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL).returncode:
        # Debian's python3 keeps venv's ensurepip in a package of its own.
        if os.geteuid() != 0 or _apt_install(["python3-venv"]):
            sys.exit("stackcheck: cannot create a venv (python3 -m venv failed; install python3-venv)")
        subprocess.run([sys.executable, "-m", "venv", "--clear", VENV], check=True)
    say("installing Python packages: " + " ".join(deps))
    done = subprocess.run([VENV_PYTHON, "-m", "pip", "install", "-q", "--disable-pip-version-check", *deps])
    if done.returncode:
        sys.exit(f"stackcheck: pip install failed ({done.returncode}); see the output above")
    with open(STAMP, "w") as f:
        f.write(digest + "\n")


def main(module, argv):
    env = dict(os.environ)
    env.pop(NOT_INSTALLED, None)  # an outer run's word, not this one's
    if os.geteuid() == 0:
        project = _project()
        left_out = {}
        for wanted in wanted_packages(project, argv):
            left_out.update(ensure_debian_packages(wanted))
        env[NOT_INSTALLED] = "".join(f"{pkg}: {why}\n" for pkg, why in sorted(left_out.items()))
        ensure_venv(project)
    elif not os.path.exists(VENV_PYTHON):
        say("must be run as root (it mounts filesystems and attaches loop devices)")
        sys.exit(2)
    env["PATH"] = env.get("PATH", "/usr/bin:/bin") + ":" + SBIN_PATH
    env["PYTHONPATH"] = ROOT + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    os.execve(VENV_PYTHON, [VENV_PYTHON, "-m", module, *argv], env)
