"""Captions of synthetic clips in several languages, from the scene's shape, colour, motion and
sound. Phrases are written per language (with German/French/Spanish agreement), not translated
word by word."""

LANGUAGES = ("en", "de", "fr", "es", "zh")

# colour -> per language: English/Chinese word; German (masculine, neuter, plural) endings;
# French and Spanish (singular, plural) for the masculine nouns used here.
_COLOURS = {
    "red": {"en": "red", "de": ("roter", "rotes", "rote"), "fr": ("rouge", "rouges"), "es": ("rojo", "rojos"), "zh": "红色"},
    "green": {"en": "green", "de": ("grüner", "grünes", "grüne"), "fr": ("vert", "verts"), "es": ("verde", "verdes"), "zh": "绿色"},
    "blue": {"en": "blue", "de": ("blauer", "blaues", "blaue"), "fr": ("bleu", "bleus"), "es": ("azul", "azules"), "zh": "蓝色"},
    "yellow": {"en": "yellow", "de": ("gelber", "gelbes", "gelbe"), "fr": ("jaune", "jaunes"), "es": ("amarillo", "amarillos"), "zh": "黄色"},
    "white": {"en": "white", "de": ("weißer", "weißes", "weiße"), "fr": ("blanc", "blancs"), "es": ("blanco", "blancos"), "zh": "白色"},
}
# shape -> per language: (singular, plural); German adds the gender index into _COLOURS["de"].
_SHAPES = {
    "circle": {"en": ("circle", "circles"), "de": ("Kreis", "Kreise", 0), "fr": ("cercle", "cercles"),
               "es": ("círculo", "círculos"), "zh": ("圆形", "圆形")},
    "square": {"en": ("square", "squares"), "de": ("Quadrat", "Quadrate", 1), "fr": ("carré", "carrés"),
               "es": ("cuadrado", "cuadrados"), "zh": ("正方形", "正方形")},
    "triangle": {"en": ("triangle", "triangles"), "de": ("Dreieck", "Dreiecke", 1), "fr": ("triangle", "triangles"),
                 "es": ("triángulo", "triángulos"), "zh": ("三角形", "三角形")},
}
_SOUNDS = {
    "high_beep": {"en": "a high beep", "de": "einen hohen Piepton", "fr": "un bip aigu", "es": "un pitido agudo", "zh": "一声高音哔声"},
    "low_beep": {"en": "a low beep", "de": "einen tiefen Piepton", "fr": "un bip grave", "es": "un pitido grave", "zh": "一声低音哔声"},
    "click": {"en": "a sharp click", "de": "ein scharfes Klicken", "fr": "un clic sec", "es": "un chasquido seco", "zh": "一声清脆的咔哒声"},
    "drum": {"en": "a deep drum hit", "de": "einen dumpfen Trommelschlag", "fr": "un coup de tambour sourd",
             "es": "un golpe de tambor grave", "zh": "一声低沉的鼓声"},
}
_TEMPLATES = {
    "horizontal": {
        "en": "{a} bounces left and right; every bounce makes {sound}.",
        "de": "{a} springt zwischen links und rechts hin und her; jeder Aufprall erzeugt {sound}.",
        "fr": "{a} rebondit de gauche à droite ; chaque rebond produit {sound}.",
        "es": "{a} rebota de izquierda a derecha; cada rebote produce {sound}.",
        "zh": "{a}左右来回弹跳，每次弹跳都会发出{sound}。",
    },
    "vertical": {
        "en": "{a} bounces up and down; every bounce makes {sound}.",
        "de": "{a} springt auf und ab; jeder Aufprall erzeugt {sound}.",
        "fr": "{a} rebondit de haut en bas ; chaque rebond produit {sound}.",
        "es": "{a} rebota de arriba abajo; cada rebote produce {sound}.",
        "zh": "{a}上下弹跳，每次弹跳都会发出{sound}。",
    },
    "collide": {
        "en": "{a} and {b} slide towards each other, collide in the middle and bounce back off the walls; every impact makes {sound}.",
        "de": "{a} und {b} gleiten aufeinander zu, stoßen in der Mitte zusammen und prallen von den Wänden ab; jeder Aufprall erzeugt {sound}.",
        "fr": "{a} et {b} glissent l'un vers l'autre, se heurtent au milieu et rebondissent sur les murs ; chaque choc produit {sound}.",
        "es": "{a} y {b} se deslizan el uno hacia el otro, chocan en el centro y rebotan en las paredes; cada impacto produce {sound}.",
        "zh": "{a}和{b}相向滑动，在中间相撞后弹回墙边，每次碰撞都会发出{sound}。",
    },
    "appear": {
        "en": "{many} appear one after another; each appearance makes {sound}.",
        "de": "{many} erscheinen nacheinander; jedes Erscheinen erzeugt {sound}.",
        "fr": "Des {many} apparaissent les uns après les autres ; chaque apparition produit {sound}.",
        "es": "Aparecen {many} uno tras otro; cada aparición produce {sound}.",
        "zh": "{many}一个接一个地出现，每次出现都会发出{sound}。",
    },
}


def _one(language: str, shape: str, colour: str) -> str:
    """'a red circle' in `language` (lower case, for use inside a sentence)."""
    words, colours = _SHAPES[shape][language], _COLOURS[colour][language]
    if language == "en":
        return f"a {colours} {words[0]}"
    if language == "de":
        return f"ein {colours[words[2]]} {words[0]}"
    if language in ("fr", "es"):  # all three nouns are masculine in both languages
        return f"un {words[0]} {colours[0]}"
    return f"一个{colours}的{words[0]}"


def _many(language: str, shape: str, colour: str) -> str:
    """'red circles' in `language`."""
    words, colours = _SHAPES[shape][language], _COLOURS[colour][language]
    if language == "en":
        return f"{colours} {words[1]}"
    if language == "de":
        return f"{colours[2]} {words[1]}"
    if language in ("fr", "es"):
        return f"{words[1]} {colours[1]}"
    return f"{colours}的{words[1]}"


def caption(language: str, motion: str, shapes: list[tuple[str, str]], sound: str) -> str:
    """shapes: [(shape, colour), ...], two for 'collide', one otherwise."""
    parts = {"sound": _SOUNDS[sound][language]}
    shape, colour = shapes[0]
    if motion == "appear":
        parts["many"] = _many(language, shape, colour)
    else:
        parts["a"] = _one(language, shape, colour)
    if motion == "collide":
        parts["b"] = _one(language, *shapes[1])
    text = _TEMPLATES[motion][language].format(**parts)
    return text[0].upper() + text[1:]


SHAPES = tuple(_SHAPES)
COLOURS = tuple(_COLOURS)
SOUNDS = tuple(_SOUNDS)
