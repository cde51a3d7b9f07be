"""`polysketch-demo`: the training demo (see `pallas_polysketch.train`).

With no arguments it trains a small PolySketchFormer on a synthetic long-range
associative-recall task (a few minutes on 2 CPU cores, with a progress bar)
and prints the validation loss and answer accuracy; `--data FILE.txt` trains a
character-level model on any UTF-8 text instead.
"""
from pallas_polysketch.train import main

if __name__ == "__main__":
  main()
