"""git: `git checkout -- F` and `git stash` put the committed F back.

prepare() makes a repository in F's directory with `new` committed and `old`
as a local change.  git writes a checked-out file by removing it and creating
it again.
"""

import os

from harness.clients import Client, register

IDENTITY = "stackcheck"


@register
class Git(Client):
    name = "git"
    command = "git"
    package = "git"
    env = {"GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null",
           "GIT_AUTHOR_NAME": IDENTITY, "GIT_AUTHOR_EMAIL": "stackcheck@localhost",
           "GIT_COMMITTER_NAME": IDENTITY, "GIT_COMMITTER_EMAIL": "stackcheck@localhost"}
    styles = {
        "checkout": "git checkout -- F: the local change dropped",
        "stash": "git stash: the local change put aside",
    }

    def prepare(self, path, old, new, session):
        directory, name = os.path.split(path)
        with open(path, "wb") as f:
            f.write(new)
        self.run([self.command, "init", "-q", "."], session, directory)
        self.run([self.command, "add", name], session, directory)
        self.run([self.command, "commit", "-q", "-m", "the committed version"], session, directory)
        with open(path, "wb") as f:
            f.write(old)

    def save(self, path, new, style, session):
        directory, name = os.path.split(path)
        argv = [self.command, "checkout", "--", name] if style == "checkout" else [self.command, "stash", "-q"]
        self.run(argv, session, directory)
        return None
