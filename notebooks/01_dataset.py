# ---
# jupyter:
#   jupytext:
#     formats: py:percent,ipynb
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Dataset: images, captions and a vocabulary
#
# **In this chapter you will learn**
#
# - what an image captioning data set is made of, and the formats it comes in;
# - how captions become sequences of integers (a *vocabulary*);
# - why the book ships its own small data set, *shapes*, and what it lets us measure.

# %% tags=["hide-input"]
# Setup. On Colab: install this book's package from its repository. Locally `make`
# has installed it already, so nothing happens here
import subprocess
import sys

REPO_URL = "https://github.com/show-attend-tell-book/show-attend-tell-book"
if "google.colab" in sys.modules:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"git+{REPO_URL}"], check=True)

# %% tags=["parameters"]
# Parameters: "shapes" runs offline on a CPU; "flickr8k" downloads Flickr8k (Colab)
DATASET = "shapes"
SEED = 0

# %%
# NBVAL_IGNORE_OUTPUT
import caption_lib

device = caption_lib.pick_device("auto")  # a GPU on Colab, the CPU here
generator = caption_lib.seed_everything(SEED)
print(f"caption_lib {caption_lib.__version__} on {device}")
