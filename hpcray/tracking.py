"""MLflow: where credentials come from (never argv), and the preflight run before anything is queued."""

from __future__ import annotations

import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from hpcray.errors import CredentialsError
from hpcray.profile import Profile
from hpcray.secrets import Secret

USERNAME_VAR = "MLFLOW_TRACKING_USERNAME"
PASSWORD_VAR = "MLFLOW_TRACKING_PASSWORD"


@dataclass(frozen=True)
class Credentials:
    username: str
    password: Secret

    def env(self) -> dict[str, Secret | str]:
        """What every Ray process of the cluster gets in its environment."""
        return {USERNAME_VAR: self.username, PASSWORD_VAR: self.password}


def load_credentials(p: Profile, *, environ: dict[str, str] | None = None,
                     stdin: TextIO | None = None) -> Credentials | None:
    """The MLflow credentials the profile says to use, or None when it uses none (or has no tracking server)."""
    source = p.mlflow.credentials
    if source == "none" or not p.mlflow.tracking_uri or p.mlflow.tracking_uri.startswith(("sqlite:", "file:")):
        return None
    if source == "env":
        env = os.environ if environ is None else environ
        user, password = env.get(USERNAME_VAR), env.get(PASSWORD_VAR)
        if not user or not password:
            missing = " and ".join(v for v, val in ((USERNAME_VAR, user), (PASSWORD_VAR, password)) if not val)
            raise CredentialsError(f"mlflow.credentials is 'env' but {missing} is not set; export it (e.g. "
                                   f"`read -s {PASSWORD_VAR}; export {PASSWORD_VAR}`), or use a credentials file")
        return Credentials(user, Secret(password))
    if source == "file":
        assert p.mlflow.credentials_file is not None  # check_profile guarantees it
        return read_credentials_file(p.resolve_path(p.mlflow.credentials_file))
    return read_credentials_stdin(stdin or sys.stdin)


def read_credentials_file(path: Path) -> Credentials:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise CredentialsError(f"{path}: credentials file not found; create it with `username=…` and `password=…` "
                               f"lines and `chmod 600 {path}`") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CredentialsError(f"{path}: credentials file is readable by others (mode {stat.S_IMODE(mode):o}); "
                               f"run `chmod 600 {path}`")
    fields: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            fields[key.strip().lower()] = value.strip()
    if not fields.get("username") or not fields.get("password"):
        raise CredentialsError(f"{path}: needs a `username=…` and a `password=…` line")
    return Credentials(fields["username"], Secret(fields["password"]))


def read_credentials_stdin(stream: TextIO) -> Credentials:
    """From a terminal: prompt (the password unechoed). From a pipe: two lines, username then password."""
    if stream.isatty():
        import getpass

        user = input("MLflow username: ").strip()
        password = getpass.getpass("MLflow password: ")
    else:
        lines = stream.read().splitlines()
        user, password = (lines + ["", ""])[:2]
    if not user.strip() or not password:
        raise CredentialsError("mlflow.credentials is 'stdin' but no username and password were given; pipe two "
                               "lines (username, then password) or run in a terminal to be prompted")
    return Credentials(user.strip(), Secret(password))
