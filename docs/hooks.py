"""MkDocs hooks of the taskbalance site (``hooks:`` in mkdocs.yml).

What the site generates instead of holding hand-written copies:

* one page per registered strategy (``strategies/<name>.md``) and the strategies index, from
  the registry (:func:`strategy_page`, :func:`strategies_index`): a new strategy gets its page
  and its nav entry with no file to write;
* the reproductions' results, from ``docs/reproductions/*.json`` (:func:`reproductions_markdown`),
  where a page has the line ``<!-- reproductions -->``;
* README sections, where a page has a line ``--8<-- "README.md:NAME"`` (the section between
  ``<!-- --8<-- [start:NAME] -->`` and ``[end:NAME]`` in README.md, the pymdownx.snippets
  syntax). They are expanded here rather than by pymdownx.snippets because README links such
  as ``docs/figures/x.png`` must be rebased onto the including page, and the section's
  headings shifted under the page's title.

Docstrings are written in the reST-ish style that ``help()`` reads well (double-backtick
literals, ``:class:`` roles, indented doctests and display equations, ``::`` literal blocks,
simple tables). :func:`docstring_to_markdown` turns them into Markdown; it serves the strategy
pages here and, as the Griffe extension :class:`ReSTDocstrings`, every docstring that
mkdocstrings renders on the API pages. Roles become optional autorefs links: a link where the
target is documented on the site, plain code otherwise.

MkDocs is imported only inside the events, and Griffe only if it is installed, so the tests can
call the generators without the ``docs`` extra.
"""

from __future__ import annotations

import ast
import html
import importlib
import inspect
import json
import os
import re
import textwrap
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
README = ROOT / "README.md"
STRATEGIES_INDEX = "strategies/index.md"
REPRODUCTIONS_MARKER = "<!-- reproductions -->"
KINDS = (("loss-level", "Loss-level"), ("gradient-level", "Gradient-level"))

# --------------------------------------------------------------------------------------------
# Docstrings: the reST-ish style of the sources -> Markdown
# --------------------------------------------------------------------------------------------

_ROLE = re.compile(r":(?:py:)?(class|meth|func|attr|mod|data|exc|obj):`([^`]+)`")
_LITERAL = re.compile(r"``(.+?)``", re.S)
_LIST_ITEM = re.compile(r"^([*+-]|\d+[.)]) +\S")
_TABLE_BORDER = re.compile(r"^=+( {2,}=+)+ *$")
_DOCTEST_DIRECTIVE = re.compile(r"\s*# doctest:.*$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _lookup(dotted: str) -> Any:
    """The Python object at ``dotted`` (a module, then attributes), or ``None``."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:split]))
        except (ImportError, ValueError):
            continue
        try:
            for part in parts[split:]:
                obj = inspect.getattr_static(obj, part)
        except AttributeError:
            return None
        return obj
    return None


def _identifier(target: str, context: str) -> str | None:
    """The canonical dotted path of a role's target, resolved from ``context`` outwards."""
    scopes = context.split(".") if context else []
    candidates = [".".join([*scopes[:k], target]) for k in range(len(scopes), 0, -1)]
    candidates += [target, f"taskbalance.{target}"]
    for candidate in candidates:
        obj = _lookup(candidate)
        if obj is None:
            continue
        if isinstance(obj, (staticmethod, classmethod)):
            obj = obj.__func__
        if isinstance(obj, property) and obj.fget is not None:
            obj = obj.fget
        if inspect.ismodule(obj):
            return obj.__name__
        if inspect.isclass(obj) or inspect.isfunction(obj):
            return f"{obj.__module__}.{obj.__qualname__}"
        return candidate  # data: the attribute's own path
    return None


def _role(match: re.Match[str], context: str) -> str:
    kind, text = match.group(1), match.group(2).strip()
    explicit = re.fullmatch(r"(.+?)\s*<(.+)>", text)
    if explicit:
        title, target = explicit.group(1), explicit.group(2)
    else:
        target = text.lstrip("~.")
        title = target.rsplit(".", 1)[-1] if text.startswith("~") else target
        if kind in ("meth", "func"):
            title += "()"
    identifier = _identifier(target.lstrip("~."), context)
    if identifier is None:
        return f"`{title}`"
    return f'<autoref identifier="{html.escape(identifier)}" optional>`{title}`</autoref>'


def _inline(text: str, context: str) -> str:
    """Inline markup of prose (a literal may span lines): literals and roles."""
    pieces = re.split(r"(``.+?``)", text, flags=re.S)  # roles never sit in a literal
    for index, piece in enumerate(pieces):
        if index % 2:
            pieces[index] = _LITERAL.sub(r"`\1`", piece)
        else:
            pieces[index] = _ROLE.sub(lambda m: _role(m, context), piece)
    return "".join(pieces)


def _fence(lines: list[str], language: str, classes: str = "") -> list[str]:
    body = textwrap.dedent("\n".join(lines)).strip("\n").splitlines()
    if language == "pycon":
        body = [_DOCTEST_DIRECTIVE.sub("", line).replace("<BLANKLINE>", "") for line in body]
    attributes = f"{{ .{language}{classes} }}" if classes else language
    return [f"``` {attributes}", *body, "```"]


def _literal_language(lines: list[str]) -> str:
    code = textwrap.dedent("\n".join(lines))
    if code.lstrip().startswith(">>>"):
        return "pycon"
    try:
        ast.parse(code)
    except SyntaxError:
        return "text"
    return "python"


def _simple_table(lines: list[str], context: str) -> list[str]:
    """A reST simple table (``===  ===`` borders) as a Markdown table."""
    border = lines[0]
    columns = [(m.start(), m.end()) for m in re.finditer(r"=+", border)]

    def cells(line: str) -> list[str]:
        bounds = [start for start, _ in columns] + [None]
        return [line[bounds[i] : bounds[i + 1]].strip() for i in range(len(columns))]

    rows: list[list[str]] = []
    for line in lines[1:]:
        if _TABLE_BORDER.match(line.strip()) or not line.strip():
            continue
        row = cells(line.ljust(len(border)))
        first = rows[-1][0] if len(rows) > 1 else ""
        if first.count("(") > first.count(")") or (len(rows) > 1 and not row[0]):
            # a continuation line: the first cell is empty or continues an open parenthesis
            rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], row)]
        else:
            rows.append(row)
    out = []
    for number, row in enumerate(rows):
        out.append("| " + " | ".join(_inline(cell, context) for cell in row) + " |")
        if number == 0:
            out.append("|" + "---|" * len(columns))
    return out


def _convert(lines: list[str], context: str) -> list[str]:
    out: list[str] = []
    i, n = 0, len(lines)
    previous_blank = True

    def block_end(start: int, minimum: int) -> int:
        """End of the block from ``start`` whose lines are blank or indented >= minimum."""
        end = start
        while end < n:
            if lines[end].strip():
                if _indent(lines[end]) < minimum:
                    break
            else:
                following = next((x for x in lines[end:] if x.strip()), None)
                if following is None or _indent(following) < minimum:
                    break
            end += 1
        return end

    paragraph: list[str] = []  # prose lines, converted together when the paragraph ends

    def flush() -> None:
        if paragraph:
            out.extend(_inline("\n".join(paragraph), context).split("\n"))
            paragraph.clear()

    while i < n:
        line = lines[i]
        stripped = line.strip()
        if not stripped:
            flush()
            out.append("")
            i, previous_blank = i + 1, True
            continue
        indent = _indent(line)
        if previous_blank and _TABLE_BORDER.match(stripped) and indent == 0:
            flush()
            end = i + 1
            borders = 1
            while end < n and borders < 3:
                borders += bool(_TABLE_BORDER.match(lines[end].strip()))
                end += 1
            out += _simple_table(lines[i:end], context)
            i, previous_blank = end, False
            continue
        if previous_blank and indent == 0 and stripped.startswith(">>>"):
            flush()
            end = i
            while end < n and lines[end].strip():
                end += 1
            out += _fence(lines[i:end], "pycon")
            i, previous_blank = end, False
            continue
        if previous_blank and indent > 0:  # an indented block: doctest, or a display
            flush()
            end = block_end(i, indent)
            block = lines[i:end]
            while block and not block[-1].strip():
                block.pop()
            if stripped.startswith(">>>"):
                out += _fence(block, "pycon")
            else:  # display equations: the literals' contents, spacing kept
                plain = [_LITERAL.sub(r"\1", x) for x in block]
                out += _fence(plain, "text", " .tb-display .no-copy")
            i, previous_blank = end, False
            continue
        item = _LIST_ITEM.match(line)
        if item and indent == 0:
            flush()
            marker = item.group(1)
            content = len(line) - len(line[len(marker) :].lstrip(" "))
            end = block_end(i + 1, content)
            body = [line[content:]] + [x[content:] for x in lines[i + 1 : end]]
            while body and not body[-1].strip():
                body.pop()
            converted = _convert(body, context)
            out.append(f"{marker} {converted[0]}")
            out += [f"    {x}" if x else "" for x in converted[1:]]
            i, previous_blank = i + len(body), False
            continue
        if stripped.endswith("::"):  # a paragraph line introducing a literal block
            text = line.rstrip()[:-2].rstrip()
            if text:
                paragraph.append(text + ":")
            flush()
            start = i + 1
            while start < n and not lines[start].strip():
                start += 1
            if start < n and _indent(lines[start]) > indent:
                end = block_end(start, _indent(lines[start]))
                block = lines[start:end]
                while block and not block[-1].strip():
                    block.pop()
                out += ["", *_fence(block, _literal_language(block))]
                i = start + len(block)
            else:
                i += 1
            previous_blank = False
            continue
        paragraph.append(line)
        i, previous_blank = i + 1, False
    flush()
    return out


def docstring_to_markdown(text: str, context: str = "") -> str:
    """Markdown for a docstring (already dedented, as ``inspect.getdoc`` gives it).

    ``context`` is the dotted path of the documented object: roles such as :meth:`end_epoch`
    are looked up from it outwards, then from ``taskbalance``.
    """
    return "\n".join(_convert(text.expandtabs().splitlines(), context)).strip("\n")


try:  # the Griffe extension exists where the docs extra is installed
    import griffe
except ImportError:  # pragma: no cover - the tests run without the docs extra
    griffe = None

if griffe is not None:

    class ReSTDocstrings(griffe.Extension):
        """Rewrites every docstring Griffe loads with :func:`docstring_to_markdown`."""

        def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
            if obj.docstring is not None:
                obj.docstring.value = docstring_to_markdown(obj.docstring.value, obj.path)


# --------------------------------------------------------------------------------------------
# Strategy pages
# --------------------------------------------------------------------------------------------


def _registry() -> Any:
    import taskbalance

    return taskbalance


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _citation(paper: str) -> str:
    if not paper:
        return "—"
    links = [
        f"[arxiv.org/abs/{number}](https://arxiv.org/abs/{number})"
        for number in re.findall(r"arXiv:(\d{4}\.\d{4,5})", paper)
    ]
    return " — ".join([paper, *links])


def _short_citation(paper: str) -> str:
    """``Authors, 'Title', Venue Year, arXiv:...`` -> ``Authors, Venue Year`` (et al. past 3)."""
    match = re.match(r"(?P<authors>[^']+?),\s*'[^']*',\s*(?P<venue>.*)$", paper)
    if match is None:
        return paper or "—"
    authors = match.group("authors")
    if authors.count(",") >= 2:
        authors = authors.split(",")[0] + " et al."
    venue = re.split(r",\s*(?:arXiv:|https?://)", match.group("venue"))[0]
    return f"{authors}, {venue}"


def _signature_block(info: Any) -> str:
    """``info.signature``, one argument per line when it is long."""
    if len(info.signature) <= 88:
        return info.signature
    options = [str(p.replace(annotation=p.empty)) for p in info.parameters]
    lines = [f'"{info.name}"', "tasks", "*", *options]
    return "tb.create_strategy(\n" + "".join(f"    {line},\n" for line in lines) + ")"


def _summary(cls: type) -> tuple[str, str]:
    """The docstring's first paragraph, and the rest."""
    summary, _, description = (inspect.getdoc(cls) or "").partition("\n\n")
    return summary, description


def _arguments_table(info: Any) -> list[str]:
    parameters = info.parameters
    if not parameters:
        return ["The strategy takes no argument besides `tasks`."]
    rows = ["| argument | default | type |", "|---|---|---|"]
    for p in parameters:
        default = "required" if p.default is p.empty else f"`{p.default!r}`"
        annotation = p.annotation  # a string under PEP 563, else an object
        if not isinstance(annotation, str):
            annotation = inspect.formatannotation(annotation)
        annotation = "" if p.annotation is p.empty else f"`{annotation}`"
        rows.append(f"| `{p.name}` | {default} | {annotation} |")
    return rows


def strategy_page(name: str) -> str:
    """The Markdown page of the registered strategy ``name``."""
    tb = _registry()
    info = tb.strategy_info(name)
    cls = info.cls
    path = f"{cls.__module__}.{cls.__qualname__}"
    summary, description = _summary(cls)
    family = next(
        (
            base.__name__
            for base in (tb.LossWeighting, tb.GradientAggregation)
            if base in cls.__mro__
        ),
        "Strategy",
    )
    where = "" if info.builtin else f" (a plug-in, from `{cls.__module__}`)"
    usage = (
        "train it with `s.backward(losses, shared_params=...)` or `features=...`"
        if info.needs_grads
        else "`s(losses)` is a differentiable total; `s.backward(losses)` trains with it"
    )
    lines = [
        f"# {name}",
        "",
        docstring_to_markdown(summary, path),
        "",
        "| kind | needs_grads | stateful | deterministic |",
        "|---|---|---|---|",
        f"| {info.kind} | {_yes(info.needs_grads)} | {_yes(info.stateful)} "
        f"| {_yes(info.deterministic)} |",
        "",
        f"**Paper:** {_citation(info.paper)}",
        "",
        f"**Class:** `{path}`{where}, a "
        f'<autoref identifier="taskbalance.{family}" optional>`{family}`</autoref>; {usage}.',
        "",
        "## Arguments",
        "",
        "```python",
        _signature_block(info),
        "```",
        "",
        *_arguments_table(info),
        "",
        "## Description",
        "",
        docstring_to_markdown(description.strip("\n"), path),
        "",
    ]
    return "\n".join(lines)


def strategies_index(names: list[str] | None = None) -> str:
    """The strategies index: one table per kind, linking every strategy's page."""
    tb = _registry()
    names = tb.list_strategies() if names is None else names
    infos = [tb.strategy_info(name) for name in names]
    lines = [
        "# Strategies",
        "",
        "Every registered strategy, with its page generated from the registry and the class's",
        "docstring: the paper, the method and its equations, the defaults, and where this",
        "implementation differs from the paper or its code.",
        "",
        "```python",
        "import taskbalance as tb",
        "",
        'print(tb.list_strategies("imtl*"))  # fnmatch patterns',
        'print(tb.strategy_info("mgda"))  # kind, paper, arguments and defaults, docstring',
        "```",
        "",
    ]
    for kind, title in KINDS:
        rows = [info for info in infos if info.kind == kind]
        if not rows:
            continue
        lines += [f"## {title}", "", "| name | summary | stateful | paper |", "|---|---|---|---|"]
        for info in rows:
            summary = docstring_to_markdown(" ".join(_summary(info.cls)[0].split()))
            paper = _short_citation(info.paper).replace("|", "\\|")
            lines.append(
                f"| [`{info.name}`]({info.name}.md) | {summary} | {_yes(info.stateful)} | {paper} |"
            )
        lines.append("")
    lines += ["## Defaults", "", '--8<-- "README.md:strategy-defaults"', ""]
    return "\n".join(lines)


def strategy_pages() -> dict[str, str]:
    """``{path under docs/: Markdown}`` of every generated strategy page and the index."""
    tb = _registry()
    pages = {STRATEGIES_INDEX: strategies_index()}
    for name in tb.list_strategies():
        pages[f"strategies/{name}.md"] = strategy_page(name)
    return pages


# --------------------------------------------------------------------------------------------
# Reproductions
# --------------------------------------------------------------------------------------------


def _measured(value: Any) -> str:
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def reproductions_markdown(directory: Path, page_dir: str = "guides") -> str:
    """One section per ``<directory>/*.json`` result: verdict, checks, notes and figure."""
    out: list[str] = []
    for path in sorted(directory.glob("*.json")):
        result = json.loads(path.read_text())
        verdict = result.get("verdict", "")
        kind = "success" if verdict == "reproduced" else "failure"
        out += [f"### {result['name']}", "", result.get("title", ""), ""]
        out += [f'!!! {kind} "Verdict: {verdict}"', ""]
        if result.get("criterion"):
            out += [f"    Criterion: {result['criterion']}", ""]
        source = result.get("published", {}).get("source")
        if source:
            out += [f"**Published:** {source}", ""]
        out += ["| claim | measured | check |", "|---|---|---|"]
        for check in result.get("checks", []):
            mark = "✓ passed" if check.get("passed") else "✗ failed"
            claim = str(check.get("claim", "")).replace("|", "\\|")
            out.append(f"| {claim} | {_measured(check.get('measured'))} | {mark} |")
        out.append("")
        for title, key in (("Deviations", "deviations"), ("Missing", "missing")):
            if result.get(key):
                out += [f"**{title}:**", "", *[f"- {item}" for item in result[key]], ""]
        if result.get("notes"):
            out += ['??? note "Notes"', ""]
            out += [f"    - {note}" for note in result["notes"]] + [""]
        minutes = result.get("wall_time_s")
        settings = json.dumps(result.get("settings", {}), indent=2, ensure_ascii=False)
        out += ['??? info "Settings"', ""]
        if minutes:
            out += [f"    Wall time: {minutes / 60:.1f} min; quick run: {result.get('quick')}.", ""]
        out += ["    ```json", *textwrap.indent(settings, "    ").splitlines(), "    ```", ""]
        if result.get("figure") and (directory / result["figure"]).exists():
            figure = os.path.relpath(directory / result["figure"], DOCS / page_dir)
            out += [f"![{result['name']}]({Path(figure).as_posix()})", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# README sections
# --------------------------------------------------------------------------------------------

_INCLUDE = re.compile(r'^--8<-- "README\.md:([\w-]+)"\s*$', re.M)
_HEADING = re.compile(r"#+ ")
_DOCS_LINK = re.compile(r"\]\(docs/([^)\s]+)\)")


def readme_section(name: str, page: str = "index.md", readme: Path = README) -> str:
    """The README section ``name``, headings under a page title, links rebased onto ``page``.

    The section's top headings become level 2 (the page has the level-1 title), and README
    links into ``docs/`` are made relative to ``page`` (a path under docs/).
    """
    text = readme.read_text()
    start, end = f"<!-- --8<-- [start:{name}] -->", f"<!-- --8<-- [end:{name}] -->"
    if start not in text or end not in text:
        raise ValueError(f"README.md has no section {name!r} (markers {start} ... {end})")
    lines = text.split(start, 1)[1].split(end, 1)[0].strip("\n").splitlines()
    prose, fenced = [], False
    for number, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            prose.append(number)
    levels = [len(lines[k]) - len(lines[k].lstrip("#")) for k in prose if _HEADING.match(lines[k])]
    shift = min(levels) - 2 if levels else 0
    page_dir = Path(page).parent.as_posix() or "."
    for k in prose:
        line = lines[k]
        if shift and _HEADING.match(line):
            line = line[shift:] if shift > 0 else "#" * -shift + line
        lines[k] = _DOCS_LINK.sub(
            lambda m: f"]({Path(os.path.relpath(m.group(1), page_dir)).as_posix()})", line
        )
    return "\n".join(lines)


def expand_includes(markdown: str, page: str) -> str:
    """Replace every ``--8<-- "README.md:NAME"`` line of a page by that README section."""
    return _INCLUDE.sub(lambda m: readme_section(m.group(1), page), markdown)


# --------------------------------------------------------------------------------------------
# MkDocs events
# --------------------------------------------------------------------------------------------


def _expand_nav(nav: list[Any]) -> None:
    """Replace the nav entry of the strategies index by a section: the index, then one page
    per registered strategy, grouped by kind."""
    tb = _registry()
    for index, entry in enumerate(nav):
        if not isinstance(entry, dict):
            continue
        for title, value in entry.items():
            if value == STRATEGIES_INDEX:
                groups = []
                for kind, label in KINDS:
                    names = [n for n in tb.list_strategies() if tb.strategy_info(n).kind == kind]
                    if names:
                        groups.append({label: [{n: f"strategies/{n}.md"} for n in names]})
                nav[index] = {title: [STRATEGIES_INDEX, *groups]}
            elif isinstance(value, list):
                _expand_nav(value)


def on_config(config: Any) -> Any:
    if config.get("nav"):
        _expand_nav(config["nav"])
    return config


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    for src, content in strategy_pages().items():
        if files.get_file_from_path(src) is None:  # a hand-written page wins
            files.append(File.generated(config, src, content=content))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    markdown = expand_includes(markdown, page.file.src_uri)
    if REPRODUCTIONS_MARKER in markdown:
        page_dir = Path(page.file.src_uri).parent.as_posix()
        generated = reproductions_markdown(DOCS / "reproductions", page_dir)
        markdown = markdown.replace(REPRODUCTIONS_MARKER, generated)
    return markdown
