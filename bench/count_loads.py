"""Run a script, logging every llama.cpp model load and chat completion by GGUF file name to $LOADS_LOG.

    LOADS_LOG=loads.txt python bench/count_loads.py recipes/clinical_qa.py --model tiny ... --out OUT
    sort loads.txt | uniq -c
"""

import os
import runpy
import sys

import llama_cpp

LOG = os.environ["LOADS_LOG"]
init, chat = llama_cpp.Llama.__init__, llama_cpp.Llama.create_chat_completion


def logged_init(self, *args, **kwargs):
    if not kwargs.get("vocab_only"):
        with open(LOG, "a") as f:
            f.write("load " + os.path.basename(kwargs.get("model_path") or args[0]) + "\n")
    init(self, *args, **kwargs)


def logged_chat(self, *args, **kwargs):
    with open(LOG, "a") as f:
        f.write("chat " + os.path.basename(self.model_path) + "\n")
    return chat(self, *args, **kwargs)


llama_cpp.Llama.__init__, llama_cpp.Llama.create_chat_completion = logged_init, logged_chat
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
