@echo off
rem Windows entry point: the same checks as ./run_tests, on Python 3.9 to 3.13 found the way Windows
rem installs it: "python" on PATH, else the py launcher's newest Python 3. Arguments are passed on
rem and the exit code is run_tests's. "python" counts only if it runs and is 3.9 or newer: the Microsoft
rem Store alias that stands in for a missing Python is on PATH but only opens the Store.
setlocal
cd /d "%~dp0"
python -c "import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)" >nul 2>nul
if errorlevel 1 goto launcher
python run_tests %*
goto done
:launcher
py -3 -c "import sys" >nul 2>nul
if errorlevel 1 goto missing
py -3 run_tests %*
goto done
:missing
echo ERROR: no Python 3.9 or newer found: neither "python" nor "py -3" runs 1>&2
exit /b 2
:done
exit /b %ERRORLEVEL%
