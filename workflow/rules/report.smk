# The grid's cells -> tables, plots and the figures of what the masks learned. The report package
# (src/gmmvit/report/*.py) is an input here only, so editing it reruns the report and nothing else.
# The mask figures also run the model and mask modules; those are no inputs here because editing
# one retrains its cells, whose new records rerun the report anyway.


rule report:
    input:
        metrics=grid_files("metrics.json"),
        # the report reads each history.csv beside its metrics.json (learning curves)
        histories=grid_files("history.csv"),
        # ... and each mask_params.pt beside it (what the masks learned)
        mask_params=grid_files("mask_params.pt"),
        measures=measure_files(),
        code=src_files("report/*.py"),
        reference=src_files("reference/paper_table.csv"),
    output:
        table=report(
            report_tables()[0],
            caption="../report/table.rst",
            category="Tables",
            labels={"table": "selected epoch"},
        ),
        table_best=report(
            report_tables()[1],
            caption="../report/table_best.rst",
            category="Tables",
            labels={"table": "best test epoch"},
        ),
        table_last=report(
            report_tables()[2],
            caption="../report/table_last.rst",
            category="Tables",
            labels={"table": "last epoch"},
        ),
        csv=report(
            report_tables()[3],
            caption="../report/table_csv.rst",
            category="Tables",
            labels={"table": "all cells (CSV)"},
        ),
        html=report(
            report_tables()[4],
            caption="../report/tables_html.rst",
            category="Tables",
            labels={"table": "the three tables"},
        ),
        history=report_tables()[5],  # every epoch of every cell (gmmvit verify)
        plots=[
            report(
                plot,
                caption=f"../report/{Path(plot).stem}.rst",
                category="Plots",
                labels={"plot": Path(plot).stem},
            )
            for plot in report_plots()
        ],
        # what each masked model learned, rebuilt from its seed-0 cell's mask_params.pt
        mask_figures=[
            report(
                figure,
                caption="../report/mask_figure.rst",
                category="What the masks learned",
                labels={"model": model, "mask": mask},
            )
            for (model, mask), figure in mask_figures().items()
        ],
    params:
        grid=config["grid"],
        out_dir=lambda wildcards, output: Path(output.table).parent,
    log:
        results("logs/report.log"),
    threads: config["resources"]["report"]["threads"]
    resources:
        mem_mb=config["resources"]["report"]["mem_mb"],
        runtime=config["resources"]["report"]["runtime"],
    conda:
        "../../envs/gmmvit.yaml"
    shell:
        "gmmvit report {input.metrics:q} --measures {input.measures:q}"
        " --reference {input.reference:q} --grid {params.grid} --out-dir {params.out_dir:q}"
        " > {log:q} 2>&1"
