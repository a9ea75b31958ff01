"""rsync of a new version over F: by default into a temporary .F.XXXXXX renamed over
F; with --inplace F itself is rewritten.  -I: no quick check by size and mtime."""

import os

from harness.clients import Client, register


@register
class Rsync(Client):
    name = "rsync"
    command = "rsync"
    package = "rsync"
    styles = {
        "default": "a temporary file beside F, renamed over F",
        "inplace": "--inplace: F rewritten where it is",
    }

    in_place = ("inplace",)

    def save(self, path, new, style, session):
        source = os.path.join(session.home, "rsync-source")
        with open(source, "wb") as f:
            f.write(new)
        extra = ["--inplace"] if style == "inplace" else []
        self.run([self.command, "-I", *extra, source, path], session, session.home)
        return None
