# Parameters and MACs (fvcore, and the paper's module-hook convention) of one model x mask at one
# image size and class count: what the table's Params / MACs / Depth columns show.


rule measure:
    input:
        code=lambda wildcards: cell_code("complexity.py", wildcards.model, wildcards.mask, None),
    output:
        json=measure_path(),
    log:
        results("logs/measure/{model}-{mask}-{img_size}px-{num_classes}c.log"),
    wildcard_constraints:
        model="[a-z0-9_]+",
        mask="[a-z0-9_]+(-k[1-9][0-9]*)?",  # a mask spec: gmm, gmm-k3
        img_size=r"\d+",
        num_classes=r"\d+",
    threads: config["resources"]["measure"]["threads"]
    resources:
        mem_mb=config["resources"]["measure"]["mem_mb"],
        runtime=config["resources"]["measure"]["runtime"],
    conda:
        "../../envs/gmmvit.yaml"
    shell:
        "gmmvit measure --model {wildcards.model} --mask {wildcards.mask}"
        " --img-size {wildcards.img_size} --num-classes {wildcards.num_classes}"
        " --out {output.json:q} > {log:q} 2>&1"
