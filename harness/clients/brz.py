"""Breezy (brz), bzr's successor: `bzr revert` is how the report rewrote a file.

prepare() makes a working tree in F's directory with `new` committed and `old`
as an uncommitted change; save() is `brz revert F`, which writes F anew and
keeps the change as F.~1~ unless told --no-backup.
"""

import os

from harness.clients import Client, ClientFailed, Run, Write, register


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

    def prepare_steps(self, name, old, new):
        return [Write(name, new), Run((self.command, "init", "-q", ".")), Run((self.command, "add", "-q", name)),
                Run((self.command, "commit", "-q", "-m", "the committed version", name)),
                Write(name, old)]  # the local change that revert undoes

    def save_steps(self, name, new, style):
        extra = ("--no-backup",) if style == "revert-no-backup" else ()
        return [Run((self.command, "revert", "-q", *extra, name))]

    def save(self, path, new, style, session):
        super().save(path, new, style, session)
        name = os.path.basename(path)
        if style == "revert":
            if not os.path.lexists(path + ".~1~"):
                raise ClientFailed(f"brz revert left no {name}.~1~")
            return name + ".~1~"
        return None
