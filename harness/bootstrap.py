"""First-use set-up for ./check: Debian packages and the project venv.

Runs under the system python3 with the standard library only, before any
dependency exists.  Installs what is missing (apt-get as root; the Python
packages of pyproject.toml into .venv), then hands over to the venv's python.
"""

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


def say(message):
    print(f"stackcheck: {message}", file=sys.stderr, flush=True)


def _project():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _apt_install(packages):
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    say(f"installing Debian packages: {' '.join(packages)}")
    subprocess.run(["apt-get", "update", "-qq"], env=env, stdout=subprocess.DEVNULL, check=False)
    done = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        # Not fatal: cases that need a missing tool report "not run" with the reason.
        say(f"apt-get install failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    return done.returncode == 0


def ensure_debian_packages(project):
    wanted = dict(project["tool"]["stackcheck"]["debian-packages"])
    # Debian's own python3 keeps its C headers (for building pyfuse3) in python3-dev.
    wanted[os.path.join(sysconfig.get_paths()["include"], "Python.h")] = "python3-dev"
    path = os.environ.get("PATH", "") + ":" + SBIN_PATH

    def present(what):
        return os.path.exists(what) if what.startswith("/") else shutil.which(what, path=path)
    missing = sorted({pkg for what, pkg in wanted.items() if not present(what)})
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        _apt_install(missing)


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
        if not (os.geteuid() == 0 and _apt_install(["python3-venv"])):
            sys.exit("stackcheck: cannot create a venv (python3 -m venv failed; install python3-venv)")
        subprocess.run([sys.executable, "-m", "venv", "--clear", VENV], check=True)
    say("installing Python packages: " + " ".join(deps))
    done = subprocess.run([VENV_PYTHON, "-m", "pip", "install", "-q", "--disable-pip-version-check", *deps])
    if done.returncode:
        sys.exit(f"stackcheck: pip install failed ({done.returncode}); see the output above")
    with open(STAMP, "w") as f:
        f.write(digest + "\n")


def main(module, argv):
    if os.geteuid() == 0:
        project = _project()
        ensure_debian_packages(project)
        ensure_venv(project)
    elif not os.path.exists(VENV_PYTHON):
        say("must be run as root (it mounts filesystems and attaches loop devices)")
        sys.exit(2)
    env = dict(os.environ)
    env["PATH"] = env.get("PATH", "/usr/bin:/bin") + ":" + SBIN_PATH
    env["PYTHONPATH"] = ROOT + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    os.execve(VENV_PYTHON, [VENV_PYTHON, "-m", module, *argv], env)
