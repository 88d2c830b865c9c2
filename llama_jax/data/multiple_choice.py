"""Multiple-choice benchmarks (C-Eval, CMMLU, MMLU) from local files, prompted as lm-eval does.

Contract
- Layouts: C-Eval `id,question,A,B,C,D,answer[,explanation]` in `dev/<s>_dev.csv` and
  `val/<s>_val.csv` (a directory or the official `ceval-exam.zip`); CMMLU `,Question,A,B,C,D,Answer`
  in `dev/<s>.csv` and `test/<s>.csv`; MMLU headerless `question,A,B,C,D,answer` in
  `dev/<s>_dev.csv` and `test/<s>_test.csv` (Hendrycks' `data/`).  A single CSV file is one subject
  (its dev file is looked for beside it, in ../dev/).
- Prompts, few-shot selection and continuations are those of lm-evaluation-harness 0.4.13's
  `ceval-valid_<s>`, `cmmlu_<s>` and `mmlu_<s>` tasks (their YAMLs: description, doc_to_text,
  first_n few-shot sampler over the dev split, target delimiter " ", few-shot delimiter "\n\n",
  choices " A" .. " D"), so that accuracies are comparable with lm-eval's and published numbers;
  tests/test_eval.py checks the prompt strings against lm-eval's own rendering.
- Bad input raises `DataError` naming the file, the line and the field: a missing column, an
  answer outside A-D, a subject without questions, too few dev rows for the shots asked.
"""
from __future__ import annotations

import csv
import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from .sources import DataError

LETTERS = ("A", "B", "C", "D")

# subject -> Chinese name, as in the task descriptions of lm-eval 0.4.13 (tasks/ceval, tasks/cmmlu)
CEVAL_SUBJECTS = {
    "accountant": "注册会计师", "advanced_mathematics": "高等数学", "art_studies": "艺术学", "basic_medicine": "基础医学",
    "business_administration": "工商管理", "chinese_language_and_literature": "中国语言文学", "civil_servant": "公务员",
    "clinical_medicine": "临床医学", "college_chemistry": "大学化学", "college_economics": "大学经济学",
    "college_physics": "大学物理", "college_programming": "大学编程", "computer_architecture": "计算机组成",
    "computer_network": "计算机网络", "discrete_mathematics": "离散数学", "education_science": "教育学",
    "electrical_engineer": "注册电气工程师", "environmental_impact_assessment_engineer": "环境影响评价工程师",
    "fire_engineer": "注册消防工程师", "high_school_biology": "高中生物", "high_school_chemistry": "高中化学",
    "high_school_chinese": "高中语文", "high_school_geography": "高中地理", "high_school_history": "高中历史",
    "high_school_mathematics": "高中数学", "high_school_physics": "高中物理", "high_school_politics": "高中政治",
    "ideological_and_moral_cultivation": "思想道德修养与法律基础", "law": "法学", "legal_professional": "法律职业资格",
    "logic": "逻辑学", "mao_zedong_thought": "毛泽东思想和中国特色社会主义理论体系概论", "marxism": "马克思主义基本原理",
    "metrology_engineer": "注册计量师", "middle_school_biology": "初中生物", "middle_school_chemistry": "初中化学",
    "middle_school_geography": "初中地理", "middle_school_history": "初中历史", "middle_school_mathematics": "初中数学",
    "middle_school_physics": "初中物理", "middle_school_politics": "初中政治", "modern_chinese_history": "近代史纲要",
    "operating_system": "操作系统", "physician": "医师资格", "plant_protection": "植物保护",
    "probability_and_statistics": "概率统计", "professional_tour_guide": "导游资格", "sports_science": "体育学",
    "tax_accountant": "税务师", "teacher_qualification": "教师资格", "urban_and_rural_planner": "注册城乡规划师",
    "veterinary_medicine": "兽医学",
}
CMMLU_SUBJECTS = {
    "agronomy": "农学", "anatomy": "解剖学", "ancient_chinese": "古汉语", "arts": "艺术学", "astronomy": "天文学",
    "business_ethics": "商业伦理", "chinese_civil_service_exam": "中国公务员考试", "chinese_driving_rule": "中国驾驶规则",
    "chinese_food_culture": "中国饮食文化", "chinese_foreign_policy": "中国外交政策", "chinese_history": "中国历史",
    "chinese_literature": "中国文学", "chinese_teacher_qualification": "中国教师资格", "clinical_knowledge": "临床知识",
    "college_actuarial_science": "大学精算学", "college_education": "大学教育学",
    "college_engineering_hydrology": "大学工程水文学", "college_law": "大学法律", "college_mathematics": "大学数学",
    "college_medical_statistics": "大学医学统计", "college_medicine": "大学医学", "computer_science": "计算机科学",
    "computer_security": "计算机安全", "conceptual_physics": "概念物理学", "construction_project_management": "建设工程管理",
    "economics": "经济学", "education": "教育学", "electrical_engineering": "电气工程", "elementary_chinese": "小学语文",
    "elementary_commonsense": "小学常识", "elementary_information_and_technology": "小学信息技术",
    "elementary_mathematics": "初等数学", "ethnology": "民族学", "food_science": "食品科学", "genetics": "遗传学",
    "global_facts": "全球事实", "high_school_biology": "高中生物", "high_school_chemistry": "高中化学",
    "high_school_geography": "高中地理", "high_school_mathematics": "高中数学", "high_school_physics": "高中物理学",
    "high_school_politics": "高中政治", "human_sexuality": "人类性行为", "international_law": "国际法学",
    "journalism": "新闻学", "jurisprudence": "法理学", "legal_and_moral_basis": "法律与道德基础", "logical": "逻辑学",
    "machine_learning": "机器学习", "management": "管理学", "marketing": "市场营销", "marxist_theory": "马克思主义理论",
    "modern_chinese": "现代汉语", "nutrition": "营养学", "philosophy": "哲学", "professional_accounting": "专业会计",
    "professional_law": "专业法学", "professional_medicine": "专业医学", "professional_psychology": "专业心理学",
    "public_relations": "公共关系", "security_study": "安全研究", "sociology": "社会学", "sports_science": "体育学",
    "traditional_chinese_medicine": "中医中药", "virology": "病毒学", "world_history": "世界历史",
    "world_religions": "世界宗教",
}


@dataclass(frozen=True)
class TaskFormat:
    name: str
    eval_split: str               # the split scored (C-Eval: val; its test answers are not public)
    header: tuple | None          # required columns (None: headerless MMLU)
    answer_prompt: str            # the last line of each question
    file_names: dict              # split -> file name pattern ({s} = subject)

    def description(self, subject: str) -> str:
        if self.name == "ceval":
            return f"以下是中国关于{_subject_name(CEVAL_SUBJECTS, subject, self.name)}的单项选择题，请选出其中的正确答案。\n\n"
        if self.name == "cmmlu":
            return f"以下是关于{_subject_name(CMMLU_SUBJECTS, subject, self.name)}的单项选择题，请直接给出正确答案的选项。\n\n"
        return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def _subject_name(table, subject, task):
    if subject not in table:
        raise DataError(f"{task}: unknown subject '{subject}' (no task description for it; known: "
                        f"{', '.join(sorted(table)[:5])}, ...)")
    return table[subject]


FORMATS = {
    "ceval": TaskFormat("ceval", "val", ("id", "question", "A", "B", "C", "D", "answer"), "答案：",
                        {"dev": "dev/{s}_dev.csv", "val": "val/{s}_val.csv"}),
    "cmmlu": TaskFormat("cmmlu", "test", ("", "Question", "A", "B", "C", "D", "Answer"), "答案：",
                        {"dev": "dev/{s}.csv", "test": "test/{s}.csv"}),
    "mmlu": TaskFormat("mmlu", "test", None, "Answer:", {"dev": "dev/{s}_dev.csv", "test": "test/{s}_test.csv"}),
}


@dataclass
class Question:
    subject: str
    question: str
    choices: tuple
    answer: int
    where: str  # file:line


@dataclass
class Subject:
    name: str
    description: str
    questions: list
    dev: list = field(default_factory=list)


# ----------------------------------------------------------------------------- reading
class BenchmarkSource:
    """A directory or a zip archive holding the split files."""

    def __init__(self, path: Path):
        self.path = path
        self.zip = zipfile.ZipFile(path) if path.is_file() and path.suffix == ".zip" else None
        if self.zip is not None:
            names = self.zip.namelist()
            # the archive may hold one top-level folder (e.g. ceval-exam/dev/...)
            roots = {n.split("/")[0] for n in names if "/" in n}
            self.prefix = ""
            if not any(n.startswith(("dev/", "val/", "test/")) for n in names) and len(roots) == 1:
                self.prefix = roots.pop() + "/"
            self.names = set(names)

    def exists(self, rel: str) -> bool:
        return (self.prefix + rel) in self.names if self.zip is not None else (self.path / rel).exists()

    def read(self, rel: str) -> tuple[str, str]:
        if self.zip is not None:
            return f"{self.path}:{self.prefix}{rel}", self.zip.read(self.prefix + rel).decode("utf-8-sig")
        p = self.path / rel
        return str(p), p.read_text(encoding="utf-8-sig")

    def subjects(self, pattern: str) -> list[str]:
        folder, stem = pattern.split("/")
        pre, post = stem.split("{s}")
        if self.zip is not None:
            names = [n[len(self.prefix) + len(folder) + 1:] for n in self.names
                     if n.startswith(self.prefix + folder + "/")]
        else:
            d = self.path / folder
            names = [p.name for p in d.iterdir()] if d.is_dir() else []
        return sorted(n[len(pre):len(n) - len(post)] for n in names
                      if n.startswith(pre) and n.endswith(post) and len(n) > len(pre) + len(post))


def read_questions(where: str, text: str, fmt: TaskFormat, subject: str, need_answer: bool = True) -> list[Question]:
    """Parse one CSV file of `fmt`'s layout; every error names the file, line and field."""
    reader = csv.reader(io.StringIO(text))
    rows = list(reader)
    if fmt.header is not None:
        if not rows:
            raise DataError(f"{where}: empty file (expected the header {','.join(fmt.header)})")
        header = [h.strip() for h in rows[0]]
        missing = [c for c in fmt.header if c not in header and (c != "answer" and c != "Answer" or need_answer)]
        if missing:
            raise DataError(f"{where}: line 1: missing column(s) {', '.join(repr(c) for c in missing)} "
                            f"(header: {','.join(rows[0])}; {fmt.name} expects {','.join(fmt.header)})")
        col = {c: header.index(c) for c in fmt.header if c in header}
        q_col, ans_col = col[fmt.header[1]], col.get(fmt.header[6])
        body, first_line = rows[1:], 2
    else:
        col = {c: i for i, c in enumerate(("question", "A", "B", "C", "D", "answer"))}
        q_col, ans_col = 0, 5
        body, first_line = rows, 1
    out = []
    for k, row in enumerate(body):
        line = first_line + k
        if not row or all(not c.strip() for c in row):
            continue
        width = max(col.values()) + 1
        if len(row) < width:
            names = fmt.header or ("question", "A", "B", "C", "D", "answer")
            raise DataError(f"{where}: line {line}: {len(row)} field(s), expected {width} "
                            f"({','.join(names)}); field '{names[len(row)]}' is missing")
        ans_name = fmt.header[6] if fmt.header else "answer"
        answer = -1
        if ans_col is not None:
            a = row[ans_col].strip()
            if a not in LETTERS:
                raise DataError(f"{where}: line {line}: field '{ans_name}' is {a!r}, expected one of A, B, C, D")
            answer = LETTERS.index(a)
        elif need_answer:
            raise DataError(f"{where}: no '{ans_name}' column")
        out.append(Question(subject, row[q_col], tuple(row[col[c]] for c in LETTERS), answer, f"{where}:{line}"))
    return out


def read_split(task: str, path: str | Path, subject: str, split: str) -> list[Question]:
    """All questions of one subject's split ('dev' or the eval split) from a dir or zip."""
    fmt = FORMATS[task]
    where, text = BenchmarkSource(Path(path)).read(fmt.file_names[split].format(s=subject))
    return read_questions(where, text, fmt, subject)


def load_subjects(task: str, path: str | Path, subjects: list[str] | None = None, shots: int = 0,
                  limit: int | None = None) -> list[Subject]:
    """The subjects of `task` found at `path` (a dir, a zip, or one CSV file), filtered by name."""
    if task not in FORMATS:
        raise DataError(f"unknown multiple-choice task {task!r} (known: {', '.join(FORMATS)})")
    fmt = FORMATS[task]
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: {task} data not found")
    if path.is_file() and path.suffix == ".csv":
        name = path.stem
        for suffix in ("_val", "_test", "_dev"):
            name = name[: -len(suffix)] if name.endswith(suffix) else name
        dev_rel = fmt.file_names["dev"].format(s=name)
        src, found = BenchmarkSource(path.parent.parent), [name]
        files = {name: (str(path), path.read_text(encoding="utf-8-sig"))}
        dev_src = src if src.exists(dev_rel) else None
    else:
        src = BenchmarkSource(path)
        pattern = fmt.file_names[fmt.eval_split]
        found = src.subjects(pattern)
        if not found:
            raise DataError(f"{path}: no {task} files ({pattern.format(s='<subject>')})")
        files = None
        dev_src = src
    if subjects:
        unknown = [s for s in subjects if s not in found]
        if unknown:
            raise DataError(f"{path}: no {task} subject(s) {', '.join(unknown)} (found: {', '.join(found[:8])}"
                            f"{', ...' if len(found) > 8 else ''})")
        found = [s for s in found if s in subjects]
    out = []
    for s in found:
        where, text = files[s] if files else src.read(fmt.file_names[fmt.eval_split].format(s=s))
        qs = read_questions(where, text, fmt, s)
        if not qs:
            raise DataError(f"{where}: subject '{s}' has no questions")
        if limit:
            qs = qs[:limit]
        dev = []
        if shots:
            rel = fmt.file_names["dev"].format(s=s)
            if dev_src is None or not dev_src.exists(rel):
                raise DataError(f"{where}: {shots}-shot needs the dev file {rel} (not found)")
            dwhere, dtext = dev_src.read(rel)
            dev = read_questions(dwhere, dtext, fmt, s)
            if len(dev) < shots:
                raise DataError(f"{dwhere}: {len(dev)} dev question(s), fewer than --shots {shots}")
            dev = dev[:shots]  # lm-eval's first_n sampler
        out.append(Subject(s, fmt.description(s), qs, dev))
    return out


# ----------------------------------------------------------------------------- prompts
def question_text(q: Question, fmt: TaskFormat) -> str:
    """lm-eval's doc_to_text: the stripped question, the four options, the answer prompt."""
    a, b, c, d = q.choices
    return f"{q.question.strip()}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\n{fmt.answer_prompt}"


def prompt(q: Question, subject: Subject, fmt: TaskFormat) -> str:
    """Description, then each dev question with its answer (' X' and a blank line), then q."""
    shots = "".join(f"{question_text(s, fmt)} {LETTERS[s.answer]}\n\n" for s in subject.dev)
    return subject.description + shots + question_text(q, fmt)


CONTINUATIONS = tuple(" " + x for x in LETTERS)  # target delimiter + choice
