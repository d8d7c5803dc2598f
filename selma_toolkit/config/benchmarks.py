"""The published text-to-image benchmarks ``selma evaluate RUN --benchmark NAME`` runs: where each
one's prompts and questions are (a public repository at a pinned commit), how they are verified,
its protocol, the judge its authors used and the closest one transformers has, licence and citation.

Pure data (the recipe's ``evaluate.benchmark`` accepts these names without importing any code);
selma_toolkit/evaluate/benchmarks.py downloads and reads the files, benchmark_run.py runs them.

Each file is pinned by its commit and by the hash of its bytes as ``https://raw.githubusercontent.com/
<repo>/<commit>/<path>`` serves them: its sha256, and its git blob id (SHA-1 of ``"blob <size>\\0"``
and the bytes, what git itself names the file by). Both were read from each repository's history
(``git ls-tree`` at the commit; ``git show <commit>:<path> | sha256sum``); where the history copy
used here lacked the file's bytes (TIFA's question file, DPG-Bench's CSV), only the blob id is
pinned, and a download is checked against it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PinnedFile:
    """A file of a GitHub repository at one commit, with the hashes its bytes must have."""

    repo: str  # owner/name
    commit: str  # 40 hex digits
    path: str  # inside the repository
    git_blob: str  # the file's git blob id at that commit
    sha256: str | None = None  # of the bytes; None where it could not be read from the repository's history

    def url(self, base: str = "https://raw.githubusercontent.com") -> str:
        """Where the file is served: ``<base>/<repo>/<commit>/<path>``."""
        return f"{base.rstrip('/')}/{self.repo}/{self.commit}/{self.path}"


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: its file, protocol, judges, licence and citation."""

    name: str
    title: str
    file: PinnedFile
    # "questions": a DSG/TIFA-style question file (evaluate/questions.py), scored by the questions'
    # answers; "prompts": a prompt list scored by VQAScore on the whole prompt.
    kind: str
    item_column: str | None  # the column naming a prompt's item (several rows per item); None: the prompt
    # DSG's dependency rule as the benchmark's own code applies it: a parent passes if it counts as
    # correct (True: DPG-Bench's code, this toolkit's held-out rule) or on its own answer (False: DSG-1k's).
    transitive_dependencies: bool
    seeds: tuple[int, ...]  # the protocol's seeds (one image per prompt per seed)
    fixed_images: bool  # whether the protocol fixes the number of images per prompt (len(seeds))
    judge: str  # the default VQA model (evaluate.benchmark_judges overrides it)
    authors_judge: str  # what the benchmark's authors (and the SELMA paper) answered with
    protocol: str  # the protocol in a sentence, and where this toolkit differs from the reference code
    licence: str
    citation: str
    homepage: str
    # The category a prompt's source (its id without the trailing number) is reported under; a source
    # not listed is its own category.
    categories: dict[str, str] = field(default_factory=dict)


DSG_1K = Benchmark(
    name="dsg-1k",
    title="DSG-1k (Davidsonian Scene Graph)",
    file=PinnedFile(
        "j-min/DSG",
        "7330119a39f76ff90e619a8bd3ff321e71aa986b",
        "dsg/data/dsg-1k-anns.csv",
        git_blob="b1b097f09ec4b36546b7266492b386a742ec5790",
        sha256="b7ce06ea8a0478ccfd8fba105ecd26d7d301eb99d5c412987546c4cc8e08917a",
    ),
    kind="questions",
    item_column="item_id",
    transitive_dependencies=False,
    seeds=(0,),
    fixed_images=False,
    judge="google/paligemma-3b-mix-448",
    authors_judge=(
        "the SELMA paper answered DSG-1k with mPLUG-large (ModelScope, not a transformers model); DSG's "
        "authors compared mPLUG-large, InstructBLIP and PaLI-17B. Closest here in kind and size to "
        "mPLUG-large: BLIP's VQA model fine-tuned on VQAv2 (Salesforce/blip-vqa-capfilt-large); PaLI's "
        "open sibling, the default: PaliGemma (google/paligemma-3b-mix-448); DSG's own InstructBLIP: "
        "Salesforce/instructblip-flan-t5-xl"
    ),
    protocol=(
        "1,060 prompts from 10 sources, one image per prompt per seed; each image scores 100 x the share of "
        "its prompt's yes/no questions answered yes, a question one of whose parents got no counting as wrong "
        "(DSG's rule as DSG's released code applies it: a parent's own answer decides, and an item whose "
        "dependency cell is not a list of numbers has none); reported overall and in DSG's eight categories, "
        "as the DSG paper does. Answers are the judge's likelier of yes and no"
    ),
    licence="Apache-2.0 (the j-min/DSG repository)",
    citation=(
        "@inproceedings{Cho2024DSG, author = {Jaemin Cho and Yushi Hu and Jason Baldridge and Roopal Garg and "
        "Peter Anderson and Ranjay Krishna and Mohit Bansal and Jordi Pont-Tuset and Su Wang}, title = "
        "{Davidsonian Scene Graph: Improving Reliability in Fine-grained Evaluation for Text-to-Image "
        "Generation}, booktitle = {ICLR}, year = {2024}}"
    ),
    homepage="https://google.github.io/dsg/",
    # DSG's data_utils.get_data_category
    categories={
        "tifa160": "tifa",
        "stanford_paragraph": "paragraph",
        "localized_narratives": "paragraph",
        "countbench": "count",
        "vrd": "relation",
        "diffusiondb": "real_user",
        "midjourney": "real_user",
        "posescript": "pose",
        "whoops": "defying",
        "drawtext": "text",
    },
)

TIFA_V1 = Benchmark(
    name="tifa-v1",
    title="TIFA v1.0",
    file=PinnedFile(
        "Yushi-Hu/tifa",
        "8e37050f44ab4ee681e4251f3c8a9d4cc86e901e",
        "tifa_v1.0/tifa_v1.0_question_answers.json",
        git_blob="6a563f9c157e5b2a24b9f4936edd3934a8a70add",
    ),
    kind="questions",
    item_column="id",
    transitive_dependencies=True,  # TIFA's questions have no dependencies
    seeds=(0,),
    fixed_images=False,
    judge="Salesforce/blip2-flan-t5-xl",
    authors_judge=(
        "the SELMA paper answered TIFA with BLIP-2 (Salesforce/blip2-flan-t5-xl here); TIFA's own "
        "default is mPLUG-large"
    ),
    protocol=(
        "4,081 prompts (COCO, DrawBench, PartiPrompts, PaintSkills), one image per prompt per seed; each image "
        "scores 100 x the share of its prompt's multiple-choice questions answered right; reported overall and "
        "per source. TIFA's code lets the judge answer freely and maps the answer to the nearest choice with "
        "SBERT; here the judge's likeliest choice is taken"
    ),
    licence="Apache-2.0 (the Yushi-Hu/tifa repository)",
    citation=(
        "@article{hu2023tifa, title = {TIFA: Accurate and Interpretable Text-to-Image Faithfulness Evaluation "
        "with Question Answering}, author = {Hu, Yushi and Liu, Benlin and Kasai, Jungo and Wang, Yizhong and "
        "Ostendorf, Mari and Krishna, Ranjay and Smith, Noah A}, journal = {arXiv preprint arXiv:2303.11897}, "
        "year = {2023}}"
    ),
    homepage="https://tifa-benchmark.github.io/",
)

DPG_BENCH = Benchmark(
    name="dpg-bench",
    title="DPG-Bench (Dense Prompt Graph)",
    file=PinnedFile(
        "TencentQQGYLab/ELLA",
        "3c228f1dc6c4d3cad0a47493816151a419f14db3",
        "dpg_bench/dpg_bench.csv",
        git_blob="98457fc9901943f51ff9a30367250fc292533bed",
    ),
    kind="questions",
    item_column="item_id",
    transitive_dependencies=True,
    seeds=(0, 1, 2, 3),
    fixed_images=True,
    judge="google/paligemma-3b-mix-448",
    authors_judge=(
        "ELLA's authors answered DPG-Bench with mPLUG-large (ModelScope, not a transformers model); "
        "the closest here as for DSG-1k"
    ),
    protocol=(
        "1,065 dense prompts, four images per prompt (ELLA's 2x2 grid, drawn here as four seeds); each image "
        "scores by DSG's rule as ELLA's code applies it (in file order, a parent that was itself failed by "
        "its parents fails its children), a prompt the mean of its four, the benchmark the mean over prompts; "
        "reported overall and per source. ELLA's script skips the CSV's first row and reports per-category accuracy "
        "from the last image only; neither is reproduced, and per-category accuracy is not computed"
    ),
    licence="Apache-2.0 (the TencentQQGYLab/ELLA repository)",
    citation=(
        "@misc{hu2024ella, title = {ELLA: Equip Diffusion Models with LLM for Enhanced Semantic Alignment}, "
        "author = {Xiwei Hu and Rui Wang and Yixiao Fang and Bin Fu and Pei Cheng and Gang Yu}, year = {2024}, "
        "eprint = {2403.05135}, archivePrefix = {arXiv}, primaryClass = {cs.CV}}"
    ),
    homepage="https://ella-diffusion.github.io/",
)

GENAI_BENCH = Benchmark(
    name="genai-bench",
    title="GenAI-Bench (527 prompts, VQAScore)",
    file=PinnedFile(
        "linzhiqiu/t2v_metrics",
        "60ce07b144b9bff24b8dac5317cb28586b1b2509",
        "genai_image.json",
        git_blob="80a4f745c4f9fd852c11b1d0de31f34559a0ae77",
        sha256="a5974a5e67f530985a12f2d5cda490f3cb1e47064a56c54817d57102a964e9ff",
    ),
    kind="prompts",
    item_column=None,
    transitive_dependencies=True,  # no questions
    seeds=(0,),
    fixed_images=False,
    judge="Qwen/Qwen2.5-VL-7B-Instruct",
    authors_judge=(
        "the VQAScore authors' strongest judge is CLIP-FlanT5-XXL (their own t2v_metrics package, not "
        "transformers); of the judges t2v_metrics also lists, Qwen2.5-VL and LLaVA-1.5 are transformers "
        "models (Qwen2.5-VL's processor needs torchvision)"
    ),
    protocol=(
        "527 compositional prompts (the GenAI-Bench set of the VQAScore paper, as its authors' t2v_metrics "
        "repository holds it; the later 1,600-prompt set lives in the Hub dataset BaiqiL/GenAI-Bench-1600, "
        "not pinned here), one image per prompt per seed, each scored 100 x VQAScore: P(yes) to 'Does this "
        'figure show "<prompt>"? Please answer yes or no.\'; reported overall (the skill tags are not in the '
        "pinned file)"
    ),
    licence="Apache-2.0 (the linzhiqiu/t2v_metrics repository)",
    citation=(
        "@article{lin2024evaluating, title = {Evaluating Text-to-Visual Generation with Image-to-Text "
        "Generation}, author = {Lin, Zhiqiu and Pathak, Deepak and Li, Baiqi and Li, Jiayao and Xia, Xide and "
        "Neubig, Graham and Zhang, Pengchuan and Ramanan, Deva}, journal = {arXiv preprint arXiv:2404.01291}, "
        "year = {2024}}; @article{li2024genaibench, title = {GenAI-Bench: Evaluating and Improving "
        "Compositional Text-to-Visual Generation}, author = {Li, Baiqi and Lin, Zhiqiu and Pathak, Deepak and "
        "Li, Jiayao and Fei, Yixin and Wu, Kewen and Ling, Tiffany and Xia, Xide and Zhang, Pengchuan and "
        "Neubig, Graham and Ramanan, Deva}, journal = {arXiv preprint arXiv:2406.13743}, year = {2024}}"
    ),
    homepage="https://linzhiqiu.github.io/papers/genai_bench/",
)

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (DSG_1K, TIFA_V1, GENAI_BENCH, DPG_BENCH)}
BENCHMARK_NAMES: tuple[str, ...] = tuple(BENCHMARKS)
