import subprocess
import sys


def test_import_is_light():
    code = ("import sys, trait_guard, trait_guard.persona, trait_guard.activations, trait_guard.models, "
            "trait_guard.chat, trait_guard.cli; "
            "heavy = [m for m in ('ray', 'deepspeed', 'mlflow') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
