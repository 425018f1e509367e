"""``chatd token`` and ``chatd secret new``: tokens that work, and a secret shared by nodes.

``chatd token`` refuses a lifetime that would print an expired token, and says on stderr
which secret it signed with, and whether it had to create it; ``chatd secret new FILE``
makes a secret file (mode 0600, never over an existing one) for several nodes, and two
``chatd serve --secret-file FILE`` accept the same token.
"""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest
from daemons import CHATD, DEADLINE, run, serve

from chatd.auth import read_secret, verify_token

pytestmark = pytest.mark.slow


def chatd(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CHATD, *args], capture_output=True, text=True, timeout=DEADLINE,
                          cwd=cwd, check=False)


@pytest.mark.parametrize("ttl", ["0", "-5", "0.5", "nan", "inf"])
def test_token_refuses_a_ttl_that_is_not_at_least_a_second(tmp_path: Path, ttl: str) -> None:
    result = chatd("token", "alice", f"--ttl={ttl}", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (f"chatd: error: --ttl must be a number of seconds, at least 1, "
                             f"not {ttl}\n")
    assert not (tmp_path / "chatd-data").exists()  # refused before touching the secret


def test_token_says_which_secret_it_created_then_read(tmp_path: Path) -> None:
    result = chatd("token", "alice", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ("chatd: secret: created chatd-data/secret (none was there; "
                             "only a daemon using this file accepts the token)\n")
    secret = read_secret(tmp_path / "chatd-data" / "secret")
    assert verify_token(secret, result.stdout.strip()).sub == "alice"
    result = chatd("token", "bob", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "chatd: secret: read from chatd-data/secret\n"
    assert verify_token(secret, result.stdout.strip()).sub == "bob"


def test_secret_new_makes_a_private_file_and_never_replaces_one(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "secret"
    result = chatd("secret", "new", str(path))
    assert (result.returncode, result.stdout) == (0, "")
    assert result.stderr == f"chatd: secret: created {path}\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert len(text) == 65 and text.endswith("\n") and int(text[:64], 16) >= 0
    result = chatd("secret", "new", str(path))
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (f"chatd: error: {path} already exists; a new secret would "
                             "invalidate every token signed with it\n")
    assert path.read_text() == text
    assert chatd("secret", "new").returncode == 2
    result = chatd("secret", "new", str(path / "under-a-file"))
    assert (result.returncode, result.stderr) == (1, f"chatd: error: cannot write {path}: "
                                                     "File exists\n")


async def test_two_nodes_with_one_secret_file_accept_the_same_token(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    result = chatd("secret", "new", str(secret))
    assert result.returncode == 0, result.stderr
    result = chatd("token", "alice", "--secret-file", str(secret))
    assert result.returncode == 0, result.stderr
    assert result.stderr == f"chatd: secret: read from {secret}\n"
    token = result.stdout.strip()
    async with (serve(tmp_path / "n1", "--secret-file", str(secret)) as n1,
                serve(tmp_path / "n2", "--secret-file", str(secret)) as n2):
        for node in (n1, n2):
            status, out, err = await run(["send", "--url", node.url, "--token", token,
                                          "--to", "bob", "hi"])
            assert status == 0, err
            assert '"type":"sent"' in out
    assert not (tmp_path / "n1" / "secret").exists()  # the data directories hold none
