"""Dataset copies installed by the system's package manager (Debian's dataset-fashion-mnist).

Such a copy is read in place when the data dir lacks the files and the user did not name a
data dir. Installing one is a change to the machine, so it happens only when asked for
(AGD_APT_INSTALL=1, which `make train` sets), only for a default data dir, only after the
download failed, and only where apt-get exists and this user may run it (root, or sudo
without a password).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

APT_ENV = "AGD_APT_INSTALL"
APT_TIMEOUT_S = 900.0  # apt-get update + a ~30 MB package on a slow mirror; a hung apt must end


@dataclass(frozen=True)
class SystemCopy:
    directory: Path
    package: str  # the Debian package that installs the files in `directory`

    @property
    def fix(self) -> str:
        return f"reinstall it with: apt-get install --reinstall {self.package}"

    @property
    def origin(self) -> str:
        return f"Debian package {self.package}"


def apt_install_wanted() -> bool:
    return os.environ.get(APT_ENV, "") not in ("", "0")


def _apt_prefix() -> tuple[list[str] | None, str]:
    """(command prefix that runs apt-get as root, "") or (None, why apt-get cannot be used)."""
    apt = shutil.which("apt-get")
    if apt is None:
        return None, "there is no apt-get on this machine"
    if os.geteuid() == 0:
        return [apt], ""
    sudo = shutil.which("sudo")
    if sudo is not None:
        try:
            if subprocess.run([sudo, "-n", "true"], capture_output=True, timeout=30).returncode == 0:
                return [sudo, "-n", apt], ""
        except (OSError, subprocess.SubprocessError):
            pass
    return None, "apt-get needs root and sudo asks for a password"


def apt_install(package: str) -> str:
    """Install ``package`` with apt-get; "" on success, else one line saying why not.

    Tries the install first, then `apt-get update` and the install again (a fresh machine
    often has no package lists yet). apt-get's own output is kept quiet unless it fails.
    """
    prefix, why = _apt_prefix()
    if prefix is None:
        return why
    print(f"installing Debian's {package} with apt-get (no download mirror could be reached)",
          file=sys.stderr, flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [*prefix, "install", "-y", "-q", package]
    result = None
    for command in (install, [*prefix, "update", "-q"], install):
        try:
            result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=APT_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as e:
            return f"{' '.join(command)} failed ({type(e).__name__}: {e})"
        if result.returncode == 0 and command is install:
            return ""
    lines = (result.stderr or result.stdout).strip().splitlines()
    return f"apt-get install {package} failed ({lines[-1] if lines else f'exit status {result.returncode}'})"
