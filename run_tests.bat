@echo off
rem Windows entry point: the same checks as ./run_tests, with the Python on PATH (3.9 to 3.13).
cd /d "%~dp0"
python run_tests %*
exit /b %ERRORLEVEL%
