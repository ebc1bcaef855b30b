import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))  # `helpers`, as the tests beside it import it
