# gmmvit: locality masks in Vision Transformers trained from scratch on small datasets.
#   snakemake --cores 2                          the default (demo) grid -> results/table.md
#   snakemake --cores 2 --config grid=paper      the paper's grid
#   snakemake --workflow-profile workflow/profiles/slurm --config grid=paper   on a SLURM cluster
#   snakemake --report report.html               tables and plots in one HTML file

from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"


# A bad config fails here, before any job starts, naming the key and what it allows.
retype_command_line_config(config, workflow)
validate(config, "workflow/schemas/config.schema.yaml")
check_config(config)


include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/measure.smk"
include: "workflow/rules/report.smk"


localrules:
    all,
    prepare,
    report,


rule all:
    input:
        report_tables(),
        report_plots(),
    default_target: True
