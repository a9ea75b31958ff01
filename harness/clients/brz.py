"""Breezy (brz), bzr's successor: `bzr revert` is how the report rewrote a file.

prepare() makes a working tree in F's directory with `new` committed and `old`
as an uncommitted change; save() is `brz revert F`, which writes F anew and
keeps the change as F.~1~ unless told --no-backup.
"""

import os

from harness.clients import Client, ClientFailed, register


@register
class Brz(Client):
    name = "brz"
    command = "brz"
    package = "brz"
    env = {"BRZ_EMAIL": "stackcheck <stackcheck@localhost>", "BRZ_PLUGIN_PATH": "-site:-user",
           "BRZ_DISABLE_PLUGINS": "launchpad"}
    styles = {
        "revert": "brz revert F: the committed F written anew, the local change kept as F.~1~",
        "revert-no-backup": "brz revert --no-backup F",
    }

    def prepare(self, path, old, new, session):
        directory, name = os.path.split(path)
        with open(path, "wb") as f:
            f.write(new)
        self.run([self.command, "init", "-q", "."], session, directory)
        self.run([self.command, "add", "-q", name], session, directory)
        self.run([self.command, "commit", "-q", "-m", "the committed version", name], session, directory)
        with open(path, "wb") as f:  # the local change that revert undoes
            f.write(old)

    def save(self, path, new, style, session):
        directory, name = os.path.split(path)
        extra = ["--no-backup"] if style == "revert-no-backup" else []
        self.run([self.command, "revert", "-q", *extra, name], session, directory)
        if style == "revert":
            if not os.path.lexists(path + ".~1~"):
                raise ClientFailed(f"brz revert left no {name}.~1~")
            return name + ".~1~"
        return None
