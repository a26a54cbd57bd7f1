"""One name per concept on the command line; the old spellings still work for one release, with a warning."""

from __future__ import annotations

import pytest

from kascade.cli import build_parser


def parse(*argv):
    return build_parser().parse_args(list(argv))


@pytest.mark.parametrize("argv,decode_only", [
    (("generate", "--prompt", "x"), False),  # generate: Kascade in both phases by default
    (("generate", "--prompt", "x", "--decode-only"), True),
    (("generate", "--prompt", "x", "--no-decode-only"), False),
    (("demo",), False),  # demo: the full method by default (smollm2-135m-11a plan)
    (("demo", "--no-decode-only"), False),
    (("demo", "--decode-only"), True),
])
def test_decode_only_flag(argv, decode_only, recwarn):
    assert parse(*argv).decode_only is decode_only
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)]


@pytest.mark.parametrize("argv,old,dest,value,new", [
    (("generate", "--prompt", "x", "--dense-prefill"), "--dense-prefill", "decode_only", True, "--decode-only"),
    (("demo", "--sparse-prefill"), "--sparse-prefill", "decode_only", False, "--no-decode-only"),
    (("eval", "--model", "m", "--budgets", "0.05", "0.2"), "--budgets", "budgets", [0.05, 0.2], "--topk-fractions"),
])
def test_deprecated_flags_still_work_and_warn(argv, old, dest, value, new, capsys):
    with pytest.warns(DeprecationWarning, match=f"{old} is deprecated"):
        args = parse(*argv)
    assert getattr(args, dest) == value
    err = capsys.readouterr().err
    assert f"is deprecated and will be removed in the next release; use {new}" in err


def test_topk_fractions_is_the_eval_budget_flag():
    assert parse("eval", "--model", "m").budgets == [0.10]
    assert parse("eval", "--model", "m", "--topk-fractions", "0.025", "0.1").budgets == [0.025, 0.1]
