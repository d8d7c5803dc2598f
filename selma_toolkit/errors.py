"""User-facing errors. The CLI prints their message as one line and exits with the error's
``exit_code`` without a traceback (``--verbose`` logs it); any other exception is a bug and keeps
its traceback.

Exit codes: 2 for input errors (:class:`InputError`: a bad recipe, file, argument value, repo id
or output path: the command cannot work until the user changes what they gave, as with click's
own usage errors), 1 for runtime errors (the input was fine but the environment failed: an
unreachable endpoint, a full disk, a held lock, a failed training step).

An error names the file, field or key, what was found, what was expected, and the next step. It
carries these as fields (``what``, ``where``, ``found``, ``expected``, ``remedies``) so that each
front end words them its own way: an option the user can change is an :class:`Option` (its
library name, ``rank``), a step is a :class:`Remedy` (set / unset / change / give / check an
option, run a command, or a plain step). ``str(error)`` words them for the library's users and the
logs (:class:`Words`: "leave rank unset or set method to svd"); the CLI's words are
``selma_toolkit/cli/words.py`` ("drop --rank or use --method svd") and the ComfyUI nodes'
``comfyui_nodes/words.py`` ("set the rank input to 0 or set the method input to svd"). An error
made from one message only (``RecipeError("...")``) is shown as it is by every front end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Option:
    """An option the user sets, by its library name (a keyword argument or recipe key: ``rank``,
    ``drop_bias_diffs``, ``out``); as a ``where`` it says which option's value is wrong."""

    name: str


@dataclass(frozen=True)
class Remedy:
    """One thing the user can do about an error, as data; each front end words it (:class:`Words`).

    ``action``: ``set`` (``option`` to ``value``, together with the ``also`` settings; a value of
    None: one of the user's choice), ``unset`` (leave ``option`` out), ``change`` (another ``option``
    value: another ``noun``, e.g. folder), ``give`` (``option``, e.g. ``value``), ``check`` (the
    ``noun`` given as ``option``), ``run`` (the shell ``command``), ``do`` (the step in ``note``).
    ``note`` after any other action says why, in parentheses."""

    action: str
    option: str = ""
    value: Any = None
    also: tuple[tuple[str, Any], ...] = ()
    noun: str = ""
    command: str = ""
    note: str = ""

    @classmethod
    def set(cls, option: str, value: Any = None, *, note: str = "", also: dict[str, Any] | None = None) -> Remedy:
        """Set ``option`` to ``value`` (None: a value of the user's choice) and the ``also`` options with it."""
        return cls("set", option, value, tuple((also or {}).items()), note=note)

    @classmethod
    def unset(cls, option: str, *, note: str = "") -> Remedy:
        """Leave ``option`` out (its default)."""
        return cls("unset", option, note=note)

    @classmethod
    def change(cls, option: str, noun: str = "", *, note: str = "") -> Remedy:
        """Give another ``option`` value (another ``noun``: a folder, a file)."""
        return cls("change", option, noun=noun, note=note)

    @classmethod
    def give(cls, option: str, example: Any = None, *, noun: str = "", note: str = "") -> Remedy:
        """Give ``option`` (``noun``: what it holds), e.g. ``example``."""
        return cls("give", option, example, noun=noun, note=note)

    @classmethod
    def check(cls, option: str, noun: str) -> Remedy:
        """Check the ``noun`` (the branch, tag or commit) given as ``option``."""
        return cls("check", option, noun=noun)

    @classmethod
    def run(cls, command: str, *, note: str = "") -> Remedy:
        """Run the shell ``command``."""
        return cls("run", command=command, note=note)

    @classmethod
    def do(cls, step: str) -> Remedy:
        """A step that names no option (free the disk, delete a file)."""
        return cls("do", note=step)

    @property
    def options(self) -> tuple[str, ...]:
        """The options this remedy names."""
        return ((self.option,) if self.option else ()) + tuple(name for name, _ in self.also)


class Words:
    """How a front end words an error's options and remedies. This base class is the library's wording
    (``str(error)``, logs): an option by its own name. The CLI and the ComfyUI nodes subclass it."""

    def option(self, name: str) -> str:
        """An option's name as the user writes it."""
        return name

    def located(self, name: str, value: Any) -> str:
        """An option with the (wrong) value it was given, leading a message: ``rank 4``, ``scorer 'x'``."""
        return f"{self.option(name)} {value!r}" if isinstance(value, str) else f"{self.option(name)} {value}"

    def setting(self, name: str, value: Any) -> str:
        """``option`` set to ``value`` (None: to a value of the user's choice)."""
        return (
            f"{self.option(name)} to {value}" if value is not None else f"{self.option(name)} to a value of your choice"
        )

    def set(self, settings: Sequence[tuple[str, Any]]) -> str:
        return "set " + " and ".join(self.setting(name, value) for name, value in settings)

    def unset(self, name: str) -> str:
        return f"leave {self.option(name)} unset"

    def change(self, name: str, noun: str) -> str:
        return f"choose another {noun} ({self.option(name)})" if noun else f"choose another {self.option(name)}"

    def give(self, name: str, example: Any, noun: str) -> str:
        text = f"give {noun} as {self.option(name)}" if noun else f"give {self.option(name)}"
        return text + (f" (e.g. {example})" if example is not None else "")

    def check(self, name: str, noun: str) -> str:
        return f"check the {noun} given as {self.option(name)}"

    def offers(self, remedy: Remedy) -> bool:
        """Whether this front end has the options ``remedy`` names (a remedy it cannot offer is left out)."""
        return True

    def remedy(self, remedy: Remedy) -> str:
        """One remedy in these words (without its note)."""
        if remedy.action == "set":
            return self.set(((remedy.option, remedy.value), *remedy.also))
        if remedy.action == "unset":
            return self.unset(remedy.option)
        if remedy.action == "change":
            return self.change(remedy.option, remedy.noun)
        if remedy.action == "give":
            return self.give(remedy.option, remedy.value, remedy.noun)
        if remedy.action == "check":
            return self.check(remedy.option, remedy.noun)
        if remedy.action == "run":
            return f"run `{remedy.command}`"
        if remedy.action == "do":
            return remedy.note
        raise ValueError(f"unknown remedy action {remedy.action!r}")

    def remedies(self, remedies: Sequence[Remedy]) -> str:
        """The alternatives the front end can offer, as one sentence: "A, B or C." ('' if none)."""
        texts = []
        for remedy in remedies:
            if not self.offers(remedy):
                continue
            text = self.remedy(remedy)
            if remedy.note and remedy.action != "do":
                text += f" ({remedy.note})"
            texts.append(text)
        if not texts:
            return ""
        sentence = texts[0] if len(texts) == 1 else ", ".join(texts[:-1]) + " or " + texts[-1]
        return sentence[:1].upper() + sentence[1:] + ("" if sentence.endswith((".", "?", "!")) else ".")


PLAIN = Words()

Location = str | Option


@dataclass
class Fields:
    """What an error is about: ``where`` (the places, outermost first: a file, a field, a key, or the
    :class:`Option` whose value is wrong), ``what`` (the problem), ``found``, ``expected``, ``details``
    (lines listed below the first line, each a text or fields of its own) and ``remedies`` (the
    alternatives, in order)."""

    what: str
    where: tuple[Location, ...] = ()
    found: Any = None
    expected: str | None = None
    details: tuple[str | Fields, ...] = ()
    remedies: tuple[Remedy, ...] = field(default_factory=tuple)

    def render(self, words: Words) -> str:
        places = []
        option_value = self.found is not None and bool(self.where) and isinstance(self.where[-1], Option)
        for index, place in enumerate(self.where):
            if isinstance(place, Option):
                last = index == len(self.where) - 1
                places.append(
                    words.located(place.name, self.found) if last and option_value else words.option(place.name)
                )
            else:
                places.append(place)
        parts = [self.what] if self.what else []
        if self.found is not None and not option_value:
            parts.append(f"found {self.found}")
        if self.expected:
            parts.append(f"expected {self.expected}")
        text = ": ".join([*places, "; ".join(parts)]) if parts else ": ".join(places)
        if self.details:
            text += "".join(f"\n  {line.render(words) if isinstance(line, Fields) else line}" for line in self.details)
        remedies = words.remedies(self.remedies)
        if remedies:
            text += ("\n" if self.details else ". ") + remedies
        return text


class SelmaError(Exception):
    """Base class for every error caused by the user's input or environment; as such a runtime error.

    Either one ``message`` (shown as it is), or fields: ``what`` the problem is, ``where`` (a place or
    :class:`Option`, or several, outermost first), what was ``found``, what was ``expected``,
    ``details`` (lines) and ``remedies`` (:class:`Remedy`, alternatives). ``str(error)`` words the
    fields for the library's users (:data:`PLAIN`); :meth:`render` words them for a front end."""

    exit_code: int = 1

    def __init__(
        self,
        message: str | None = None,
        *,
        what: str | None = None,
        where: Location | Sequence[Location] = (),
        found: Any = None,
        expected: str | None = None,
        details: Sequence[str | Fields] = (),
        remedies: Sequence[Remedy] = (),
    ) -> None:
        if (message is None) == (what is None):
            raise TypeError("a SelmaError takes either a message or fields (what=...), not both")
        places = (where,) if isinstance(where, (str, Option)) else tuple(where)
        self.fields = None if what is None else Fields(what, places, found, expected, tuple(details), tuple(remedies))
        self.message = message
        self.context: tuple[str, ...] = ()
        self.words: Words = PLAIN
        super().__init__(self.render(PLAIN))  # args: the library's sentence (repr, pickling)

    def within(self, place: str) -> SelmaError:
        """This error with ``place`` (a file, a node) named before everything it names; returns itself,
        so that ``raise error.within(path) from None`` keeps its class and fields."""
        self.context = (place, *self.context)
        self.args = (self.render(PLAIN),)
        return self

    def render(self, words: Words) -> str:
        """The message in a front end's ``words``."""
        text = self.fields.render(words) if self.fields is not None else self.message or ""
        return ": ".join([*self.context, text])

    def __str__(self) -> str:
        return self.render(self.words)


class InputError(SelmaError):
    """What the user gave (an argument value, a recipe, a file, a name) is wrong; exit code 2."""

    exit_code = 2


class RecipeError(InputError):
    """A recipe file is missing, malformed or holds an invalid value."""


class LoraFormatError(InputError):
    """A LoRA file cannot be read, written or merged as asked."""


class DatasetError(InputError):
    """A prompt file or image dataset is missing or malformed."""


class TrainingError(SelmaError):
    """Training cannot go on: a checkpoint cannot be written or read (disk full, damaged folder)."""


class ModelError(InputError):
    """A base model cannot be found or loaded. An input error: nearly every one is a reference that
    names no usable model (a failed model download is reported the same way, so it exits 2 too)."""


class EndpointError(SelmaError):
    """An LLM endpoint is misconfigured, unreachable or keeps answering garbage. A runtime error:
    the recipe names an endpoint, and what it does (or the key the environment holds) is outside it."""


class HubError(SelmaError):
    """A Hugging Face Hub operation failed or was refused (unreachable, HTTP error, no token, a
    download that fails its check): a runtime error; what the user wrote wrong is a HubInputError."""


class HubInputError(HubError, InputError):
    """A repo id, a file name in a repo, a catalog name or a catalog file that is not valid."""

    exit_code = 2


class ModelDownloadError(SelmaError):
    """A model's files could not be fetched from the Hub although the reference may be right (no
    network, a server error, offline mode without a cached copy): a runtime failure, unlike a
    reference that names no model (``ModelError``)."""


class OutputError(InputError):
    """An output file or folder cannot be written where it was asked for (a file in the way, no permission)."""


class FolderLockedError(SelmaError):
    """Another process holds the lock of a run folder (two `selma run` on one folder at once)."""


class DiskFullError(SelmaError, OSError):
    """No space left (or quota exceeded) while writing an output; also an OSError (with ``errno``
    and ``strerror``), so code that handles failed writes (training checkpoints) keeps handling it."""
