"""Datasets: the Anti-DreamBooth folder layout, and a small sample that works offline."""

from benchbase.hookspecs import hookimpl


@hookimpl
def register_datasets(register):
    register("folder", "benchbase_plugins.datasets.folder:FolderDataset", version="1",
             description="<root>/<identity>/set_A|set_B|set_C/*.png|jpg (Anti-DreamBooth layout)")
    register("sample", "benchbase_plugins.datasets.sample:SampleDataset", version="1",
             description="public-domain portraits shipped in installed packages, augmented into set_A/B/C")
