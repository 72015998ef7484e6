# Create (or reuse) the venv and install madclip exactly as the README says; sourced by quickstart.sh and test.sh.
VENV="${VENV:-.venv}"
python3 -m venv "$VENV"
. "$VENV/bin/activate"
pip install -q --upgrade pip
pip install -q torch==2.14.1 torchvision==0.29.1
pip install -q -e ".[all]"
