# One job per cell (dataset, model, mask, seed, recipe). A cell reruns when its resolved recipe
# overrides change (params), when the package code that trains it changes (inputs), or when its
# rule changes; never because another dataset's recipe or the report changed.


rule train:
    input:
        unpack(train_inputs),
    output:
        metrics=cell_path("metrics.json"),
        history=cell_path("history.csv"),
        mask_params=cell_path("mask_params.pt"),  # the final mask parameters: the report's figures
    params:
        base=lambda wildcards: config["recipes"][wildcards.recipe]["base"],
        overrides=lambda wildcards: overrides_json(wildcards.recipe, wildcards.dataset),
        data=lambda wildcards: dataset_arguments(wildcards.dataset),
        numerics=config.get("numerics", "portable"),  # a param: the kernels change the numbers
        out_dir=lambda wildcards, output: Path(output.metrics).parent,
    log:
        cell_log(),
    wildcard_constraints:
        model="[a-z0-9_]+",
        mask="[a-z0-9_]+(-k[1-9][0-9]*)?",  # a mask spec: gmm, gmm-k3
        seed=r"\d+",
    threads: train_resources()["threads"]
    resources:
        mem_mb=train_resources()["mem_mb"],
        runtime=train_resources()["runtime"],
        gpu=train_resources().get("gpu", 0),  # 0: a CPU job (SLURM asks for no GPU)
        # A resource, not a param: keeping checkpoints changes no number, so flipping it must rerun
        # nothing (Snakemake reruns on changed params, never on resources). A string: not consumable.
        keep_checkpoint="yes" if config.get("keep_checkpoints") else "no",
        # Local GPU runs: the job claims a free (device, k) slot (gmmvit.devices); strings, like
        # keep_checkpoint: where a cell ran changes no number, so changing these reruns nothing.
        device_slots=device_slots_argument(),
        cells_per_gpu=str(config.get("cells_per_gpu", 1)),
    conda:
        "../../envs/gmmvit.yaml"
    shell:
        "gmmvit train --dataset {wildcards.dataset} --model {wildcards.model} --mask {wildcards.mask}"
        " --seed {wildcards.seed} --recipe {params.base} --recipe-name {wildcards.recipe}"
        " --overrides {params.overrides:q}"
        " {params.data:q} --threads {threads} --numerics {params.numerics} --out {params.out_dir:q}"
        " --keep-checkpoint {resources.keep_checkpoint}"
        " --device-slots {resources.device_slots:q} --cells-per-gpu {resources.cells_per_gpu}"
        " > {log:q} 2>&1"
