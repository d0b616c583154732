"""Training-time defenses."""

from benchbase.hookspecs import hookimpl


@hookimpl
def register_defenses(register):
    register("none", "benchbase_plugins.defenses.basic:NoDefense", version="1",
             description="plain fine-tuning: prompts, batches and loss unchanged")
    register("cdl", "benchbase_plugins.defenses.cdl:CDL", version="1",
             description="DiffShortcut contrastive decoupling learning: noise-token prompt pairing, "
                         "', without <phrase>' at generation")
