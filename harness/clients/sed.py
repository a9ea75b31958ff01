"""GNU sed -i: writes the edited text to a temporary file beside F and renames it over F."""

from harness.clients import Client, Run, register


@register
class Sed(Client):
    name = "sed"
    command = "sed"
    package = "sed"
    styles = {"in-place": "sed -i: a temporary file in F's directory renamed over F"}

    def save_steps(self, name, new, style):
        text = new.decode().rstrip("\n")
        for special in "\\/&":
            text = text.replace(special, "\\" + special)
        return [Run((self.command, "-i", "-e", f"s/.*/{text}/", name))]  # F has one line
