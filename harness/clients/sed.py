"""GNU sed -i: writes the edited text to a temporary file beside F and renames it over F."""

import os

from harness.clients import Client, register


@register
class Sed(Client):
    name = "sed"
    command = "sed"
    package = "sed"
    styles = {"in-place": "sed -i: a temporary file in F's directory renamed over F"}

    def save(self, path, new, style, session):
        directory, name = os.path.split(path)
        text = new.decode().rstrip("\n")
        for special in "\\/&":
            text = text.replace(special, "\\" + special)
        self.run([self.command, "-i", "-e", f"s/.*/{text}/", name], session, directory)  # F has one line
        return None
