# Downloads happen here, once per dataset, never inside training jobs. A local rule: cluster compute
# nodes often have no internet. Without access to the official address, set GMMVIT_<NAME>_URL (a
# mirror's URL or a local archive) in snakemake's environment; a failed job's log says what else works.


rule prepare:
    output:
        marker="{marker}",
    params:
        dataset=lambda wildcards: prepared_markers()[wildcards.marker],
        data_root=lambda wildcards: dataset_root(prepared_markers()[wildcards.marker]),
    log:
        results("logs/prepare/{marker}.log"),
    wildcard_constraints:
        # only the markers of this config's downloadable datasets (the wildcard is a whole path)
        marker="|".join(map(re.escape, prepared_markers())) or "(?!)",
    threads: config["resources"]["prepare"]["threads"]
    resources:
        mem_mb=config["resources"]["prepare"]["mem_mb"],
        runtime=config["resources"]["prepare"]["runtime"],
    conda:
        "../../envs/gmmvit.yaml"
    shell:
        "gmmvit prepare {params.dataset} --data-root {params.data_root:q} > {log:q} 2>&1"
