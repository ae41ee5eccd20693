"""Generate the default caption set for data/estimate_covariance.py (deterministic given --seed).

    python data/make_captions.py [--n 24000] [--seed 0] [--out data/captions.txt]

No caption corpus can be downloaded where this project is built, so this script composes varied
synthetic captions from word lists: everyday photo descriptions, people and animals doing things,
objects in relation to each other, product shots, landscapes, art-style prompts and the
training prompt templates. A real corpus (e.g. 100k LAION or COCO captions) covers the text
distribution better and is preferable for real models.
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

from ldm.data.templates import TEMPLATES, fill
from ldm.errors import UserError
from ldm.util import REPO_ROOT, atomic_path

ANIMALS = ["cat", "kitten", "tabby cat", "black cat", "siamese cat", "dog", "puppy", "golden retriever",
           "corgi", "husky", "border collie", "german shepherd", "horse", "pony", "cow", "sheep", "goat",
           "pig", "rabbit", "hamster", "guinea pig", "parrot", "owl", "eagle", "hawk", "duck", "swan",
           "goose", "penguin", "flamingo", "pigeon", "crow", "fox", "wolf", "bear", "polar bear", "panda",
           "red panda", "koala", "kangaroo", "lion", "tiger", "leopard", "snow leopard", "cheetah",
           "elephant", "giraffe", "zebra", "monkey", "gorilla", "deer", "moose", "reindeer", "squirrel",
           "raccoon", "hedgehog", "otter", "seal", "sea lion", "dolphin", "whale", "shark", "octopus",
           "jellyfish", "turtle", "tortoise", "frog", "lizard", "chameleon", "snake", "butterfly", "bee",
           "ladybug", "dragonfly", "goldfish", "crab", "lobster", "chicken", "rooster", "camel", "llama",
           "alpaca", "bat", "mouse", "rat", "donkey", "bison", "hippo", "rhino", "sloth", "lemur", "beaver"]

PEOPLE = ["man", "woman", "young man", "young woman", "old man", "old woman", "child", "little boy",
          "little girl", "baby", "teenager", "couple", "family", "group of friends", "crowd of people",
          "chef", "baker", "doctor", "nurse", "firefighter", "police officer", "astronaut", "soldier",
          "farmer", "fisherman", "surfer", "skateboarder", "cyclist", "runner", "ballet dancer", "musician",
          "guitarist", "drummer", "painter", "student", "teacher", "scientist", "businessman",
          "businesswoman", "tourist", "hiker", "climber", "skier", "snowboarder", "swimmer", "tennis player",
          "soccer player", "baseball player", "knight", "wizard", "princess", "king", "queen", "pirate",
          "samurai", "cowboy", "clown", "monk", "street vendor", "mechanic", "waiter", "photographer",
          "bride", "groom", "grandmother", "grandfather", "toddler", "mother and her daughter",
          "father and his son", "superhero", "robot", "android", "ghost", "vampire", "elf", "viking"]

OBJECTS = ["mug", "coffee cup", "teapot", "teacup", "vase", "bowl", "plate", "wine glass", "bottle",
           "water bottle", "jar", "backpack", "handbag", "suitcase", "umbrella", "chair", "armchair", "sofa",
           "table", "desk", "lamp", "desk lamp", "clock", "alarm clock", "book", "stack of books", "notebook",
           "pencil", "fountain pen", "laptop", "keyboard", "computer mouse", "smartphone", "camera",
           "headphones", "television", "radio", "record player", "guitar", "piano", "violin", "drum kit",
           "trumpet", "bicycle", "motorcycle", "car", "sports car", "vintage car", "bus", "truck",
           "fire truck", "train", "steam locomotive", "tram", "boat", "sailboat", "canoe", "yacht",
           "airplane", "helicopter", "hot air balloon", "rocket", "kite", "skateboard", "surfboard", "skis",
           "football", "basketball", "tennis racket", "baseball bat", "teddy bear", "doll", "toy car",
           "toy robot", "rubber duck", "action figure", "lego set", "sneaker", "pair of boots", "hat",
           "straw hat", "baseball cap", "scarf", "sweater", "jacket", "dress", "sunglasses", "wristwatch",
           "necklace", "ring", "candle", "lantern", "pumpkin", "apple", "banana", "orange", "lemon",
           "strawberry", "watermelon", "pineapple", "pizza", "burger", "sandwich", "cake",
           "birthday cake", "cupcake", "donut", "ice cream cone", "sushi platter", "loaf of bread",
           "croissant", "plate of pasta", "bowl of ramen", "salad", "cup of tea", "glass of orange juice",
           "potted plant", "cactus", "bonsai tree", "bouquet of roses", "sunflower", "tulip", "fire hydrant",
           "stop sign", "traffic light", "park bench", "mailbox", "lighthouse", "windmill", "castle",
           "log cabin", "bridge", "tent", "fountain", "statue", "clock tower", "skyscraper", "barn",
           "treehouse", "telescope", "globe", "chess board", "kettle", "frying pan", "toaster",
           "sewing machine", "typewriter", "vinyl record", "basket of fruit", "pillow", "blanket", "mirror",
           "wooden chest", "treasure map", "crown", "sword", "shield", "robot vacuum", "drone", "tractor",
           "shopping cart", "wheelbarrow", "birdhouse", "snowman", "sandcastle", "paper lantern",
           "plush toy", "ceramic figurine", "porcelain doll", "sculpture", "houseplant", "succulent"]

ADJECTIVES = ["small", "large", "tiny", "huge", "old", "new", "vintage", "modern", "shiny", "dusty", "fluffy",
              "wet", "colorful", "cute", "happy", "sleepy", "curious", "angry", "beautiful", "elegant",
              "broken", "antique", "handmade", "futuristic", "rustic", "cozy", "giant", "miniature"]
COLORS = ["red", "blue", "green", "yellow", "orange", "purple", "pink", "white", "black", "gray", "brown",
          "golden", "silver", "turquoise", "navy blue", "pastel pink", "dark green", "beige", "teal"]
MATERIALS = ["wooden", "metal", "glass", "ceramic", "plastic", "marble", "stone", "knitted", "leather",
             "paper", "crystal", "bronze", "porcelain", "velvet", "wicker", "copper", "chrome"]
MADE_OF = ["wood", "glass", "ice", "gold", "lego bricks", "clay", "paper", "cardboard", "chocolate",
           "marble", "crystal", "yarn", "metal", "cheese", "flowers", "smoke", "water", "candy", "stone"]

ANIMAL_ACTIONS = ["sitting", "sleeping", "running", "jumping", "eating", "lying down", "standing",
                  "playing with a ball", "looking at the camera", "swimming", "yawning", "walking",
                  "wearing a hat", "wearing sunglasses", "wearing a red scarf", "curled up", "drinking water",
                  "climbing a tree", "hiding in the grass", "catching a frisbee", "chasing a butterfly",
                  "wearing a tiny crown", "sitting in a cardboard box", "resting its head on a pillow"]
PERSON_ACTIONS = ["riding a bicycle", "riding a horse", "holding an umbrella", "reading a book",
                  "cooking dinner", "drinking coffee", "playing the guitar", "playing the piano",
                  "talking on the phone", "taking a photo", "walking a dog", "eating a sandwich",
                  "painting a picture", "carrying a backpack", "waiting for the bus", "dancing", "laughing",
                  "sitting on a bench", "standing in line", "flying a kite", "throwing a frisbee",
                  "surfing a wave", "skiing down a slope", "climbing a rock wall", "working on a laptop",
                  "holding a baby", "jogging", "waving", "smiling at the camera", "wearing a raincoat",
                  "holding a cup of coffee", "selling fruit", "fixing a car", "watering plants",
                  "looking out of a window", "blowing out birthday candles", "swinging a tennis racket",
                  "kicking a soccer ball", "writing in a notebook", "feeding pigeons"]
RELATIONS = ["next to", "on top of", "under", "behind", "in front of", "inside", "beside", "near",
             "on", "leaning against", "surrounded by", "between two", "reflected in", "sitting on",
             "hiding behind", "lying next to", "in the shadow of", "to the left of", "to the right of"]
VERBS_SUBJECT_OBJECT = ["holding", "carrying", "looking at", "playing with", "chasing", "hugging", "sniffing",
                        "pushing", "riding", "sitting on", "standing next to", "reaching for"]

SCENES = ["on a beach", "in a forest", "in a snowy forest", "on a city street", "in a kitchen",
          "in a living room", "in a garden", "in a park", "on a mountain top", "in the desert", "underwater",
          "in outer space", "on the moon", "in a field of flowers", "on a wooden table",
          "on a white background", "in a library", "in a cafe", "at a train station", "in a subway car",
          "in the rain", "at sunset", "at night", "in a photo studio", "on a boat", "on a frozen lake",
          "by a river", "in a cave", "in a jungle", "on a rooftop", "in a classroom", "in a museum",
          "at a farmers market", "on a farm", "in a bathroom", "on a bed", "on a windowsill", "in the snow",
          "among autumn leaves", "in a neon-lit alley", "in a medieval village", "in Tokyo", "in Paris",
          "in New York City", "in Venice", "on a country road", "in a parking lot", "at an airport",
          "in a supermarket", "on a sports field", "in a swimming pool", "on a picnic blanket",
          "in a greenhouse", "in a bakery", "in a workshop", "on a kitchen counter", "on a bookshelf",
          "in a bedroom", "in an office", "on a balcony", "in a meadow", "near a waterfall",
          "in a wheat field", "at a campfire", "in a hospital", "at a wedding", "at a concert",
          "in a castle hall", "on a spaceship", "in a futuristic city", "in a fairy tale forest",
          "in a busy market", "on the grass", "on a sandy dune", "in the fog", "under a starry sky",
          "on a snowy mountain", "in a cherry blossom garden", "in a rice field", "on a pier"]
SURFACES = ["a wooden table", "a marble countertop", "a white background", "a concrete floor", "a linen cloth",
            "a kitchen counter", "a desk", "a shelf", "green grass", "a stone wall", "a velvet cushion",
            "a mirror", "black velvet", "a sandy beach", "a rustic wooden board"]
LANDSCAPES = ["a mountain lake", "a misty valley", "a desert canyon", "a tropical beach", "a snowy village",
              "a rolling green hillside", "a dense pine forest", "a rocky coastline", "a lavender field",
              "a waterfall in the jungle", "a city skyline", "a quiet harbor", "an ancient temple",
              "a volcano", "a glacier", "a river delta", "a bamboo forest", "an icy tundra",
              "a sunflower field", "a foggy bridge", "a small fishing village", "a busy highway",
              "a mountain road", "an old lighthouse on a cliff", "a rainforest", "a city park in spring",
              "a frozen waterfall", "a red rock arch", "an abandoned factory", "a sprawling metropolis"]
TIMES = ["at sunrise", "at sunset", "at dusk", "at night", "at noon", "in winter", "in autumn", "in spring",
         "in summer", "during a storm", "after the rain", "under the northern lights", "in heavy fog",
         "on a cloudy day", "under a full moon", "at golden hour", "in the morning mist"]

STYLES = ["a photo", "a close-up photo", "a black and white photo", "a vintage photograph", "a polaroid photo",
          "an oil painting", "a watercolor painting", "a pencil sketch", "a charcoal drawing", "a 3d render",
          "a digital painting", "an anime illustration", "a cartoon drawing", "pixel art", "a low poly model",
          "a claymation still", "an origami sculpture", "a stained glass window", "a mosaic",
          "a children's book illustration", "a comic book panel", "an ink drawing", "a linocut print",
          "a marble statue", "a needlepoint embroidery", "a pop art poster", "a vector illustration",
          "a concept art piece", "an ukiyo-e woodblock print", "a graffiti mural", "a minimalist poster",
          "a cinematic still", "a renaissance painting", "an impressionist painting", "a surreal painting",
          "a long exposure photo", "a macro photograph", "an aerial photograph", "a studio portrait"]
ARTISTS = ["vincent van gogh", "claude monet", "rembrandt", "katsushika hokusai", "pablo picasso",
           "johannes vermeer", "gustav klimt", "salvador dali", "andy warhol", "frida kahlo",
           "edward hopper", "alphonse mucha", "j. m. w. turner", "georgia o'keeffe"]
QUALITY = ["highly detailed", "4k", "8k", "high resolution", "sharp focus", "soft lighting",
           "dramatic lighting", "studio lighting", "natural light", "golden hour", "bokeh", "35mm film",
           "shallow depth of field", "wide angle", "trending on artstation", "award winning photograph",
           "cinematic", "volumetric light", "octane render", "unreal engine", "muted colors",
           "vibrant colors", "pastel colors", "high contrast", "film grain", "hdr", "symmetrical",
           "intricate", "matte painting", "professional photography", "dslr", "product photography"]
WEARABLES = ["hat", "scarf", "crown", "santa hat", "backpack", "bow tie", "pair of sunglasses", "chef hat",
             "superhero cape"]
SHOTS = ["close-up of", "portrait of", "wide shot of", "top view of", "side view of", "photo of",
         "picture of", "image of", "macro shot of", "silhouette of", "reflection of", "drawing of"]


def article(phrase: str) -> str:
    """'a'/'an' + phrase, or the phrase itself for plural/mass phrases that start with a quantifier."""
    if phrase.split(" ", 1)[0] in ("group", "crowd", "pair", "stack", "family", "couple"):
        return "a " + phrase
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def noun(rng: random.Random) -> str:
    return rng.choice(rng.choice([ANIMALS, PEOPLE, OBJECTS, OBJECTS]))


def described(rng: random.Random, thing: str) -> str:
    """`thing` with 0-2 modifiers (size/mood, colour or material)."""
    mods = []
    if rng.random() < 0.35:
        mods.append(rng.choice(ADJECTIVES))
    if rng.random() < 0.35:
        mods.append(rng.choice(COLORS if thing not in PEOPLE else ["smiling", "tired", "young", "elderly"]))
    if thing in OBJECTS and rng.random() < 0.25:
        mods.append(rng.choice(MATERIALS))
    return " ".join(mods + [thing])


def quality(rng: random.Random, k_max: int = 3) -> str:
    return ", ".join(rng.sample(QUALITY, rng.randint(1, k_max)))


def everyday(rng):  # COCO-like scene description
    kind = rng.random()
    if kind < 0.4:
        subject = rng.choice(ANIMALS)
        return f"{article(described(rng, subject))} {rng.choice(ANIMAL_ACTIONS)} {rng.choice(SCENES)}"
    if kind < 0.8:
        return f"{article(described(rng, rng.choice(PEOPLE)))} {rng.choice(PERSON_ACTIONS)} {rng.choice(SCENES)}"
    return f"{article(described(rng, rng.choice(OBJECTS)))} {rng.choice(SCENES)}"


def relation(rng):
    a, b = described(rng, noun(rng)), noun(rng)
    rel = rng.choice(RELATIONS)
    target = b + "s" if rel == "between two" else article(b)
    scene = f" {rng.choice(SCENES)}" if rng.random() < 0.4 else ""
    return f"{article(a)} {rel} {target}{scene}"


def interaction(rng):
    subject = rng.choice(ANIMALS + PEOPLE)
    thing = described(rng, rng.choice(OBJECTS))
    scene = f" {rng.choice(SCENES)}" if rng.random() < 0.5 else ""
    return f"{article(described(rng, subject))} {rng.choice(VERBS_SUBJECT_OBJECT)} {article(thing)}{scene}"


def product(rng):
    thing = described(rng, rng.choice(OBJECTS))
    return f"{article(thing)} on {rng.choice(SURFACES)}, {quality(rng, 2)}"


def landscape(rng):
    text = f"{rng.choice(LANDSCAPES)} {rng.choice(TIMES)}"
    if rng.random() < 0.5:
        text = f"{rng.choice(STYLES)} of {text}"
    return text + (f", {quality(rng)}" if rng.random() < 0.6 else "")


def art(rng):
    subject = described(rng, noun(rng))
    text = f"{rng.choice(STYLES)} of {article(subject)}"
    r = rng.random()
    if r < 0.3:
        text += f" {rng.choice(SCENES)}"
    elif r < 0.45:
        text += f" in the style of {rng.choice(ARTISTS)}"
    elif r < 0.6:
        text += f" made of {rng.choice(MADE_OF)}"
    return text + (f", {quality(rng)}" if rng.random() < 0.7 else "")


def template(rng):
    return fill(rng.choice(TEMPLATES), described(rng, noun(rng)) if rng.random() < 0.3 else noun(rng))


def short(rng):
    r = rng.random()
    if r < 0.4:
        return noun(rng)
    if r < 0.7:
        return article(described(rng, noun(rng)))
    return f"{rng.choice(SHOTS)} {article(noun(rng))}"


def personalised(rng):  # the kind of prompt a personalised concept is used in
    subject = rng.choice(ANIMALS + OBJECTS[:80])
    r = rng.random()
    if r < 0.25:
        return f"{article(subject)} wearing {article(rng.choice(WEARABLES))}"
    if r < 0.5:
        return f"{article(subject)} {rng.choice(SCENES)}, {quality(rng, 2)}"
    if r < 0.7:
        return f"{article(subject)} in the style of {rng.choice(ARTISTS)}"
    if r < 0.85:
        return f"{article(subject)} made of {rng.choice(MADE_OF)}"
    return f"{article(subject)} and {article(rng.choice(ANIMALS + OBJECTS))} {rng.choice(SCENES)}"


def long_caption(rng):  # two to six clauses; some exceed CLIP's 77 tokens, to exercise truncation
    parts = [rng.choice([everyday, relation, interaction])(rng) for _ in range(rng.randint(2, 6))]
    text = ", while ".join(parts[:2]) + "".join(f", and {p}" for p in parts[2:])
    return text + f", {quality(rng, 5)}"


KINDS = [(everyday, 22), (relation, 12), (interaction, 12), (product, 8), (landscape, 9), (art, 14),
         (template, 6), (short, 6), (personalised, 7), (long_caption, 4)]


def generate(n: int, seed: int = 0) -> list[str]:
    """`n` distinct captions, the same for the same (n, seed)."""
    rng = random.Random(seed)
    makers, weights = zip(*KINDS)
    seen: set[str] = set()
    captions: list[str] = []
    attempts = 0
    while len(captions) < n:
        attempts += 1
        if attempts > 50 * n:
            raise UserError(f"could not compose {n} distinct captions (got {len(captions)}); lower --n")
        text = " ".join(rng.choices(makers, weights)[0](rng).split())
        if text not in seen:
            seen.add(text)
            captions.append(text)
    return captions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a deterministic synthetic caption file, one caption per line.")
    parser.add_argument("--n", type=int, default=24000, help="number of distinct captions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO_ROOT / "data" / "captions.txt"))
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n must be at least 1, got {args.n}")
    captions = generate(args.n, args.seed)
    with atomic_path(args.out) as tmp:
        tmp.write_text("\n".join(captions) + "\n", encoding="utf-8")
    size = Path(args.out).stat().st_size
    print(f"wrote {len(captions)} captions ({size / 1e6:.2f} MB) to {args.out}")
    return 0

