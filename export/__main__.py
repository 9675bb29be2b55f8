"""`python -m export {onnx,engines,verify} ...`: see export/engines.py."""

from export.engines import main

main()
