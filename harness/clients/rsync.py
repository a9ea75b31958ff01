"""rsync of a new version over F: by default into a temporary .F.XXXXXX renamed over
F; with --inplace F itself is rewritten.  -I: no quick check by size and mtime."""

from harness.clients import Client, Run, Write, register


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

    def save_steps(self, name, new, style):
        extra = ("--inplace",) if style == "inplace" else ()
        return [Write("{home}/rsync-source", new), Run((self.command, "-I", *extra, "{home}/rsync-source", name))]
