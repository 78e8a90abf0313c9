"""The manual pages: man/mkman.py turns include/nbdkit-async.h into section 3
pages. Every function the header exports must have a page (its own or an
alias of its group's), every page must render through man-db and groff
without a single troff warning, the overview must carry a compiling example
and the threading rules, and a copy installed under share/man/man3 must be
what `man nbdkit_reply` finds.

Needs man-db and groff-base (apt-get install man-db groff-base) and a C
compiler; builds nothing else, so it runs in a few seconds.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEADER = ROOT / "include" / "nbdkit-async.h"
MKMAN = ROOT / "man" / "mkman.py"
PYTHON = "/usr/bin/python3"
CC = os.environ.get("CC", "cc")
TIMEOUT = 60


def need(tool, package):
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is missing: apt-get install -y {package}")


def man_env(**extra):
    env = dict(os.environ)
    for k in ("MANPATH", "MANOPT", "MANSECT", "MANROFFOPT", "MANPL", "MANLESS"):
        env.pop(k, None)
    env.update(MANWIDTH="80", MANPAGER="cat", PAGER="cat", LC_ALL="C.UTF-8",
               MAN_DISABLE_SECCOMP="1")
    env.update(extra)
    return env


def run(cmd, **kw):
    kw.setdefault("env", man_env())
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, **kw)


def plain(text):
    """man's output without overstrike bold/underline."""
    return re.sub(r".\x08", "", text)


def squash(text):
    return re.sub(r"\s+", " ", text).strip()


def mkman(outdir, *args, header=HEADER):
    return run([PYTHON, str(MKMAN), "--header", str(header), *args, str(outdir)])


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    out = tmp_path_factory.mktemp("man")
    p = mkman(out)
    assert p.returncode == 0, p.stderr
    return out


def is_alias(path):
    return path.read_text().startswith(".so ")


def resolve(path):
    """The page an alias points to (.so man3/X.3), or the page itself."""
    text = path.read_text()
    m = re.fullmatch(r"\.so man3/([\w.-]+\.3)\n", text)
    if text.startswith(".so"):
        assert m, f"{path.name}: malformed alias: {text!r}"
        target = path.parent / m.group(1)
        assert target.exists() and not is_alias(target), f"{path.name} -> {m.group(1)}"
        return target
    return path


def section(source, name):
    """The troff source of one .SH section, font escapes removed."""
    m = re.search(rf"^\.SH \"?{name}\"?\n(.*?)(?=^\.SH |\Z)", source, re.M | re.S)
    assert m, f"no {name} section"
    return re.sub(r"\\f[BIRP]|\\&|\\%", "", m.group(1)).replace("\\-", "-")


def header_functions():
    """Every function the header declares, read independently of mkman.py:
    comments, #defines and struct bodies removed, what remains is
    prototypes."""
    text = HEADER.read_text()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"^\s*#.*$", "", text, flags=re.M)
    text = re.sub(r"typedef struct \w+ \{.*?\} \w+;", "", text, flags=re.S)
    names = re.findall(r"\b(nbdkit_\w+)\s*\(", text)
    assert len(names) == len(set(names))
    return names


def struct_fields(name):
    text = re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.S)
    m = re.search(rf"typedef struct {name} \{{(.*?)\}} {name};", text, re.S)
    assert m, name
    fields = []
    for decl in m.group(1).split(";"):
        f = re.search(r"\(\s*\*\s*(\w+)\s*\)", decl) or re.search(r"(\w+)\s*(?:\[\w*\])?\s*$", decl)
        if f:
            fields.append(f.group(1))
    return fields


def test_every_exported_function_has_a_page(pages):
    functions = header_functions()
    assert len(functions) >= 40, functions
    for fn in functions:
        path = pages / f"{fn}.3"
        assert path.exists(), f"no page or alias for {fn}"
        source = resolve(path).read_text()
        names = section(source, "NAME").split(" - ")[0]
        assert fn in re.split(r",\s*", names.strip()), f"{path.name}: NAME does not name {fn}"
        assert re.search(rf"\b{fn}\(", section(source, "SYNOPSIS")), f"{fn} not in its SYNOPSIS"
        assert "SEE ALSO" in source and "nbdkit\\-async\\fR(3)" in source


def test_plugin_structs_document_every_field(pages):
    for struct in ("nbdkit_plugin_lowlevel", "nbdkit_plugin", "nbdkit_stats", "nbdkit_extent"):
        source = resolve(pages / f"{struct}.3").read_text()
        assert f".SS \"struct {struct}\"" in source
        block = source.split(f".SS \"struct {struct}\"", 1)[1].split("\n.SS ", 1)[0]
        fields = struct_fields(struct)
        assert fields
        for field in fields:
            assert re.search(rf"^\.TP\n\\fI{field}\\fR\n(?!\.)", block, re.M), \
                f"{struct}.{field} has no documented entry"


def test_generator_is_deterministic_and_lists_its_files(pages, tmp_path):
    p = mkman(tmp_path / "again")
    assert p.returncode == 0, p.stderr
    first = sorted(f.name for f in pages.iterdir())
    assert first == sorted(f.name for f in (tmp_path / "again").iterdir())
    for name in first:
        assert (pages / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    listed = run([PYTHON, str(MKMAN), "--header", str(HEADER), "--list"])
    assert listed.returncode == 0, listed.stderr
    assert sorted(listed.stdout.split()) == first


def test_a_function_without_doc_comment_fails_the_generator(tmp_path):
    text = HEADER.read_text()
    doc = re.search(r"/\*\*(?:(?!\*/).)*\*/\n(?=int nbdkit_reply\(struct)", text, re.S)
    assert doc, "the doc comment of nbdkit_reply was not found"
    broken = tmp_path / "nbdkit-async.h"
    broken.write_text(text[:doc.start()] + text[doc.end():])
    p = mkman(tmp_path / "out", header=broken)
    assert p.returncode != 0
    assert "nbdkit_reply" in p.stderr and "doc comment" in p.stderr, p.stderr


def test_troff_specials_in_doc_comments_come_out_as_text(tmp_path):
    """A doc line starting with '.' or an apostrophe, a backslash, a minus
    and non-ASCII text are printed as written, not taken as troff."""
    need("man", "man-db")
    tricky = (" * .PP is text here, not a macro.\n *\n"
              " * 'Quoted' starts a line; a backslash \\fB stays, as do C:\\dir,\n"
              " * `a\\b`, na\u00efve and -EINVAL.\n *\n")
    text = HEADER.read_text()
    anchor = " * Answers an op with success."
    assert anchor in text
    header = tmp_path / "nbdkit-async.h"
    header.write_text(text.replace(anchor, tricky + anchor), encoding="utf-8")
    p = mkman(tmp_path / "out", header=header)
    assert p.returncode == 0, p.stderr
    page = tmp_path / "out" / "nbdkit_reply.3"
    p = run(["groff", "-man", "-Tutf8", "-ww", "-z", str(page)])
    assert p.returncode == 0 and p.stderr == "", p.stderr
    p = run(["man", "-l", "--warnings=w", str(page)])
    assert p.returncode == 0 and p.stderr == "", p.stderr
    out = squash(plain(p.stdout))
    assert ".PP is text here, not a macro." in out
    assert "'Quoted' starts a line; a backslash \\fB stays, as do C:\\dir, a\\b, na\u00efve and -EINVAL." in out


def test_pages_render_without_troff_warnings(pages):
    need("groff", "groff-base")
    need("man", "man-db")
    full = sorted(p for p in pages.iterdir() if not is_alias(p))
    for page in full:
        p = run(["groff", "-man", "-Tutf8", "-ww", "-z", str(page)])
        assert p.returncode == 0 and p.stderr == "", f"{page.name}:\n{p.stderr}"
    # And through man-db, as a reader sees them, at two widths.
    for width in ("80", "60"):
        p = run(["man", "-l", "--warnings=w", *map(str, full)], env=man_env(MANWIDTH=width))
        assert p.returncode == 0 and p.stderr == "", p.stderr
        assert plain(p.stdout).count("\nNAME\n") == len(full)


def test_overview_has_the_model_the_threading_rules_and_a_working_example(pages, tmp_path):
    need("man", "man-db")
    source = (pages / "nbdkit-async.3").read_text()
    p = run(["man", "-l", "--warnings=w", str(pages / "nbdkit-async.3")])
    assert p.returncode == 0 and p.stderr == "", p.stderr
    text = squash(plain(p.stdout))
    for heading in ("THE MODEL", "THREADS AND OWNERSHIP", "RETURN VALUE", "EMBEDDING",
                    "EXAMPLES", "LINKING", "SEE ALSO"):
        assert f" {heading} " in text, heading
    # The header's opening comment, word for word.
    opening = HEADER.read_text().split("*/", 1)[0]
    rules = squash(re.sub(r"^ \* ?", "", opening.split("Ownership and threading", 1)[1], flags=re.M))
    assert "Ownership and threading" + rules.replace("`", "") in text.replace("(3)", "")
    for rule in ("exactly once", "-EBUSY", "Thread-safe", "Async-signal-safe", "Set-up thread only",
                 "must not block", "pkg-config --cflags --libs nbdkit-async"):
        assert rule in text, rule
    for reply in ("nbdkit_reply", "nbdkit_reply_read", "nbdkit_reply_read_nocopy",
                  "nbdkit_reply_error", "nbdkit_reply_extents", "nbdkit_reply_read_extents"):
        assert f"{reply}(3)" in text, reply
    # What callbacks return, from the nbdkit_plugin_lowlevel doc.
    assert "do not return its result" in text
    # SEE ALSO names every page.
    see_also = section(source, "SEE ALSO")
    for page in pages.iterdir():
        if not is_alias(page) and page.name != "nbdkit-async.3":
            assert f"{page.stem}(3)" in see_also, page.name

    # The example compiles, warning-free, against the real header.
    need(CC, "gcc")
    m = re.search(r"^\.SH EXAMPLES\n.*?^\.EX\n(.*?)^\.EE$", source, re.M | re.S)
    assert m, "no example"
    code = m.group(1)
    for esc, ch in (("\\e", "\\"), ("\\-", "-"), ("\\&", ""), ("\\(aq", "'"), ("\\(dq", '"')):
        code = code.replace(esc, ch)
    assert "nbdkit_server_new" in code and "nbdkit_main_loop" in code and "nbdkit_reply (op)" in code
    example = tmp_path / "tiny.c"
    example.write_text(code)
    p = run([CC, "-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic", "-fsyntax-only",
             "-I", str(ROOT / "include"), str(example)])
    assert p.returncode == 0, p.stderr


def test_installed_pages_are_what_man_finds(pages, tmp_path):
    need("man", "man-db")
    man3 = tmp_path / "share" / "man" / "man3"
    man3.mkdir(parents=True)
    for page in pages.iterdir():
        shutil.copy(page, man3 / page.name)
    env = man_env(MANPATH=str(tmp_path / "share" / "man"))

    p = run(["man", "-w", "nbdkit_reply"], env=env)
    assert p.returncode == 0 and Path(p.stdout.strip()) == man3 / "nbdkit_reply.3", p.stdout + p.stderr
    p = run(["man", "-P", "cat", "nbdkit_reply"], env=env)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    text = squash(plain(p.stdout))
    assert text.startswith("nbdkit_reply(3)") and "int nbdkit_reply(struct nbdkit_op *op);" in text

    # Every function and plugin struct by its own name, aliases followed,
    # in one man run.
    names = header_functions() + ["nbdkit_plugin_lowlevel", "nbdkit_plugin"]
    p = run(["man", "--warnings=w", "3", *names], env=env)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    out = plain(p.stdout)
    assert out.count("\nNAME\n") == len(names)
    for name in names:
        assert re.search(rf"\b{name}\b", out), name
    p = run(["man", "-w", "nbdkit-async"], env=env)
    assert p.returncode == 0 and p.stdout.strip() == str(man3 / "nbdkit-async.3"), p.stderr
