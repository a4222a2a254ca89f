"""`import statejax` gives the names a user starts from, and stays light until they are used."""

import subprocess
import sys

import statejax
from statejax.budget import Budget
from statejax.checkpoint.gguf_import import load_gguf_checkpoint
from statejax.checkpoint.hf_import import load_hf_checkpoint
from statejax.errors import InputError, ItemsRefusedError
from statejax.serving.results import Answer, FlashResult, QueryResult
from statejax.serving.session import Session
from statejax.serving.streaming import StreamingSession


def test_public_names_are_the_library_objects():
    assert statejax.Session is Session and statejax.StreamingSession is StreamingSession
    assert statejax.Budget is Budget and statejax.load_hf_checkpoint is load_hf_checkpoint
    assert statejax.Answer is Answer and statejax.QueryResult is QueryResult
    assert statejax.FlashResult is FlashResult and statejax.InputError is InputError
    assert statejax.ItemsRefusedError is ItemsRefusedError
    assert statejax.load_gguf_checkpoint is load_gguf_checkpoint
    assert callable(statejax.pretrained.load_default)
    assert set(statejax.__all__) <= set(dir(statejax))


def test_unknown_names_say_what_is_public():
    try:
        statejax.Sesion  # noqa: B018
    except AttributeError as e:
        assert "Sesion" in str(e) and "Session" in str(e)
    else:
        raise AssertionError("statejax.Sesion resolved")


def test_import_is_light():
    """No profiling tools, plotting or JAX on `import statejax`; none of the profilers or
    plots after taking the serving names either."""
    code = ("import sys, statejax\n"
            "heavy = ('jax', 'statejax.perf', 'matplotlib', 'statejax.serving')\n"
            "assert not [m for m in heavy if m in sys.modules], sorted(sys.modules)\n"
            "statejax.Session, statejax.StreamingSession, statejax.Budget\n"
            "loaded = [m for m in sys.modules if m.startswith(('statejax.perf', 'matplotlib'))]\n"
            "assert not loaded, loaded\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
