"""GNU Emacs (emacs-nox): the editor of the original report (LP#1879196).

Interactive: `emacs -nw -Q`, the whole buffer replaced by typing, C-x C-s, then
C-x C-c, for each backup style.  Batch: `emacs --batch` doing the same in Lisp,
for speed where the terminal adds nothing.  While the buffer is modified Emacs
keeps its lock file (.#F) beside F, as it does for a person.
"""

import os

from harness.clients import Client, ClientFailed, Run, register

# Lisp run before F is visited: no startup screen, no version-control calls, the style's
# backups.  backup-enable-predicate: Emacs makes no backups of files under /tmp (where run
# directories often are); a person's files are elsewhere, and get them.
SETTINGS = {
    "backup-rename": "(setq make-backup-files t backup-by-copying nil)",
    "backup-copy": "(setq make-backup-files t backup-by-copying t)",
    "no-backup": "(setq make-backup-files nil)",
}
COMMON = ("(setq inhibit-startup-screen t vc-handled-backends nil auto-save-default nil "
          "backup-enable-predicate (lambda (_name) t))")


def _lisp_string(text):
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _identity(path):
    """Which file is at path, and when it last changed: a backup made over an older F~
    (one the host made, say) replaces or rewrites it."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_ctime_ns


@register
class Emacs(Client):
    name = "emacs"
    command = "emacs"
    package = "emacs-nox"
    styles = {
        "backup-rename": "the default: F renamed to F~, a new F written",
        "backup-copy": "backup-by-copying: F copied to F~, F rewritten in place",
        "no-backup": "make-backup-files nil: F rewritten in place",
        "batch": "emacs --batch with the default settings: the same save in Lisp, no terminal",
    }

    in_place = ("backup-copy", "no-backup")

    def save_steps(self, name, new, style):
        lisp = (f"(progn {COMMON} {SETTINGS.get(style, '')} (find-file {_lisp_string(name)}) (erase-buffer) "
                f"(insert {_lisp_string(new.decode())}) (save-buffer))")
        return [Run((self.command, "--batch", "-Q", "--eval", lisp))]

    def save(self, path, new, style, session):
        directory, name = os.path.split(path)
        backup_before = _identity(path + "~")
        text = new.decode().rstrip("\n")
        if style == "batch":
            self.do(self.save_steps(name, new, style), directory, session)
        else:
            emacs = self.spawn([self.command, "-nw", "-Q", "--eval", f"(progn {COMMON} {SETTINGS[style]})", name],
                               session, directory)
            self.wait(emacs, r"\(Fundamental\)", f"{name} shown in its buffer")
            emacs.send("\x18h\x17")             # C-x h C-w: the whole buffer killed
            emacs.send(text + "\r")             # typed, as a person would
            emacs.send("\x18\x13")              # C-x C-s
            self.wait(emacs, r"Wrote ", "the 'Wrote' message of C-x C-s")
            emacs.send("\x18\x03")              # C-x C-c
            self.finish(emacs, "C-x C-c")
        made_backup = _identity(path + "~") not in (None, backup_before)
        if style in ("backup-rename", "backup-copy") and not made_backup:
            raise ClientFailed(f"emacs ({style}) saved {name} without making {name}~")
        return name + "~" if made_backup else None
