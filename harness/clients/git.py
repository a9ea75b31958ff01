"""git: `git checkout -- F` and `git stash` put the committed F back.

prepare() makes a repository in F's directory with `new` committed and `old`
as a local change.  git writes a checked-out file by removing it and creating
it again.
"""

from harness.clients import Client, Run, Write, register

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

    def prepare_steps(self, name, old, new):
        return [Write(name, new), Run((self.command, "init", "-q", ".")), Run((self.command, "add", name)),
                Run((self.command, "commit", "-q", "-m", "the committed version")), Write(name, old)]

    def save_steps(self, name, new, style):
        return [Run((self.command, "checkout", "--", name) if style == "checkout" else (self.command, "stash", "-q"))]
